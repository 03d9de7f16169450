"""Named rolling recordings (`pktipc record`) on a live veth stream, in a
network namespace of the test's own: rotation and removal, what the kept
files hold (read back by libpcap, tshark and capinfos), attaching by name,
the broker's quota, a disk that fills up (a tiny tmpfs the test mounts),
a stalled recording's drops in its statistics blocks, broker restarts."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pytest
from conftest import BrokerProc, Netns, pktipc_cmd, run_pktipc
from opshelp import wait_for
from pcapref import read_pcap
from test_dispatcher import World
from test_live import OTHER, frame, receive, serve_live, udp4
from test_writer import tshark

import pktipc
from pktipc._client import recording
from pktipc._protocol import RequestRefused, Welcomed
from pktipc._tools import cli

ISB_FIELDS = ("pcapng.options.option.data.interface.received",
              "pcapng.options.option.data.interface.dropped",
              "pcapng.options.option.data.interface.delivered_to_user",
              "pcapng.options.option.data.comment")


def frames(start: int, n: int, size: int = 120) -> list[bytes]:
    """Frames that say their number in their first payload bytes."""
    return [frame(OTHER, udp4(4000, 9, size, a=i % 250) [:28] + struct.pack("!I", i)
                  + bytes(size - 4)) for i in range(start, start + n)]


def state(name: str) -> dict[str, Any] | None:
    return next((r for r in recording.recordings() if r["name"] == name), None)


def wait_packets(name: str, n: int, timeout: float = 60) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        st = state(name)
        return st if st is not None and st["packets"] >= n else None
    return wait_for(f"recording {name} to hold {n} packets", probe, timeout, every=0.05)


def kept(st: dict[str, Any]) -> list[Path]:
    return [Path(st["dir"]) / f["name"] for f in st["files"]]


def isb(path: Path) -> list[list[str]]:
    """The interface statistics blocks' options (received, dropped,
    delivered, comment), as tshark's reading of the file's blocks shows them."""
    out = subprocess.run(["tshark", "-X", "read_format:MIME Files Format", "-r", str(path),
                          "-T", "pdml"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = []
    for block in ElementTree.fromstring(out.stdout).iter("field"):
        if block.get("name") != "pcapng.block" or not any(
                f.get("name") == "pcapng.block.type" and f.get("show") == "0x00000005"
                for f in block):
            continue
        fields = {f.get("name"): f.get("show", "") for f in block.iter("field")}
        rows.append([fields.get(name, "") for name in ISB_FIELDS])
    return rows


def utc(ns: int) -> list[str]:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ns // 1_000_000_000)).split()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(
        f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0]


@pytest.fixture
def recs() -> Iterator[None]:
    """Every recording still there is stopped after the test, and its
    recorder must be gone."""
    yield
    pids = []
    for r in recording.recordings():
        pids.append(r["pid"])
        recording.stop(r["name"], r["server"])
    for pid in pids:
        wait_for(f"recorder {pid} to end", lambda pid=pid: not alive(pid), timeout=30)
    assert recording.recordings() == []


@pytest.fixture
def ns(netns: Netns) -> Netns:
    netns.veth("va", "vb")
    return netns


def start(*args: str) -> subprocess.CompletedProcess[str]:
    r = run_pktipc("record", "start", *args)
    return r


def test_detached_recording_rotates_keeps_the_last_packets_and_attaches(
        ns: Netns, broker: Any, tmp_path: Path, recs: None) -> None:
    """A detached recording outlives its starter; over a live stream its
    files rotate and the oldest go; every kept file is whole (libpcap,
    tshark, capinfos); they hold exactly the last packets sent, bytes and
    nanosecond times as the broker captured them, the removed ones exactly
    the earlier ones; attach --no-follow gives the kept packets, attach
    then the live ones after them, with no hole nor repeat at the seam."""
    b = serve_live(broker, ns, "-i", "va")
    out = tmp_path / "rec"
    out.mkdir()
    r = start("--server", b.name, "tap", "-w", str(out), "--max-size", "16k", "--files", "4",
              "--detach")
    assert r.returncode == 0, r.stderr
    assert "recording 'tap'" in r.stderr and "4 files of 16,384 bytes" in r.stderr
    st = state("tap")
    assert st is not None and st["state"] == "running" and alive(st["pid"])
    sent = frames(0, 600)
    with pktipc.connect(b.name, "watch") as watch:
        assert ns.send("vb", sent, tmp_path) == len(sent)
        seen = receive(watch, len(sent))
    assert [p.data for p in seen] == sent
    st = wait_packets("tap", len(sent))
    assert st["packets"] == len(sent) and st["state"] == "running"
    files = kept(st)
    assert len(files) == 4 and st["files"][-1]["number"] >= 4      # rotated three times or more
    assert st["removed"]["files"] >= 1
    assert sorted(out.iterdir()) == files                   # the removed ones are gone
    got = []
    for f in files:
        assert f.stat().st_size <= 16 * 1024
        ref = read_pcap(str(f))
        assert ref.error is None and ref.linktype == 1
        got += ref.packets
        assert subprocess.run(["capinfos", str(f)], capture_output=True).returncode == 0
        # every packet names its interface and came in (to another host's address)
        assert tshark(f, "frame.interface_name", "frame.packet_flags_direction",
                      "frame.packet_flags_reception_type") == [
            ["va", "0x00000001", "4"]] * len(ref.packets)
    k = len(got)
    assert 0 < k < len(sent)
    assert [p.data for p in got] == sent[-k:]
    assert [p.ts_ns for p in got] == [p.ts_ns for p in seen[-k:]]
    assert st["removed"]["packets"] == len(sent) - k
    listed = run_pktipc("record", "list").stdout.splitlines()
    assert listed[0].split() == ["NAME", "BROKER", "STATE", "PACKETS", "BYTES", "DROPS", "FILES",
                                 "OLDEST", "(UTC)", "NEWEST", "(UTC)"]
    [row] = [line.split() for line in listed[1:] if line.split()[0] == "tap"]
    assert row == ["tap", b.name, "running", "600", str(sum(map(len, sent))), "0", "4",
                   *utc(seen[-k].ts_ns), *utc(seen[-1].ts_ns)]      # the oldest kept, the last
    closed = files[:-1]
    for f in closed:        # each closed file ends with its statistics block
        [(received, dropped, delivered, comment)] = isb(f)
        assert int(delivered) == len(read_pcap(str(f)).packets) and dropped == "0"
        assert comment.startswith("pktipc: drops: kernel 0, broker 0, recording 0")
    # attach --no-follow: exactly what is kept, in order.
    nf = tmp_path / "kept.pcapng"
    r = run_pktipc("record", "attach", "tap", "--no-follow", "-w", str(nf))
    assert r.returncode == 0, r.stderr
    assert [p.data for p in read_pcap(str(nf)).packets] == sent[-k:]
    # attach: what is kept, then live packets, across the seam.
    live = tmp_path / "live.pcapng"
    att = subprocess.Popen(pktipc_cmd("record", "attach", "tap", "-w", str(live)),
                           stderr=subprocess.PIPE, text=True)
    try:
        more = frames(len(sent), 150)
        wait_for("attach to have read what is kept", lambda: live.exists()
                 and live.stat().st_size >= nf.stat().st_size, every=0.02)
        assert ns.send("vb", more, tmp_path) == len(more)
        wait_packets("tap", len(sent) + len(more))
        time.sleep(0.5)
    finally:
        att.send_signal(signal.SIGINT)
        assert att.wait(timeout=30) == 0, att.stderr.read() if att.stderr else ""
        if att.stderr:
            att.stderr.close()
    assert [p.data for p in read_pcap(str(live)).packets] == sent[-k:] + more
    # stop: the recorder ends, the broker forgets its client, the files stay.
    pid = state("tap")["pid"]                                         # type: ignore[index]
    r = run_pktipc("record", "stop", "tap")
    assert r.returncode == 0, r.stderr
    assert "recording 'tap' stopped: 750 packets" in r.stderr
    assert state("tap") is None and not alive(pid)
    assert [c.name for c in pktipc.broker_stats(b.name).clients] == []
    assert len(list(out.iterdir())) == 4


def test_without_detach_it_ends_with_its_starter(broker: Any, tmp_path: Path,
                                                 recs: None) -> None:
    """Ctrl-C ends it at once; a starter killed outright ends it too: the
    recorder sees its starter go and closes its file whole."""
    b = _idle_broker(broker, tmp_path)
    for how in (signal.SIGINT, signal.SIGKILL):
        p = subprocess.Popen(pktipc_cmd("record", "start", "--server", b.name, "fg", "-w",
                                        str(tmp_path)), stderr=subprocess.PIPE, text=True)
        st = wait_for("the recording to run", lambda: state("fg"))
        pid = st["pid"]
        assert alive(pid) and st["detached"] is False
        if how == signal.SIGINT:     # an attach that dies takes nothing with it
            att = subprocess.Popen(pktipc_cmd("record", "attach", "fg", "-w",
                                              str(tmp_path / "att.pcapng")))
            wait_for("attach to write", lambda: (tmp_path / "att.pcapng").exists())
            att.kill()
            assert att.wait(timeout=30) == -signal.SIGKILL
            (tmp_path / "att.pcapng").unlink()
            assert alive(pid) and state("fg")["state"] == "running"   # type: ignore[index]
        p.send_signal(how)
        rc = p.wait(timeout=30)
        assert rc == (0 if how == signal.SIGINT else -signal.SIGKILL)
        if p.stderr:
            p.stderr.close()
        wait_for("the recorder to end", lambda pid=pid: not alive(pid), timeout=30)
        assert state("fg") is None
        wait_for("the broker to forget it", lambda: not pktipc.broker_stats(b.name).clients)
        f = tmp_path / st["files"][0]["name"]
        assert read_pcap(str(f)).error is None and isb(f)
        f.unlink()


def test_ctrl_c_taken_by_another_thread_of_the_starter_ends_it(
        broker: Any, tmp_path: Path, recs: None) -> None:
    """A SIGINT sent to a process may be taken by any of its threads that
    does not block it (here numpy's BLAS worker), and one may come just
    before a blocking read: the starter, waiting for its recorder to end,
    still acts on it and stops the recording, whose file is whole; so does
    an attach. The signal goes to that other thread alone (tgkill)."""
    import ctypes

    b = _idle_broker(broker, tmp_path)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}     # a worker thread, whatever the CPUs
    p = subprocess.Popen(pktipc_cmd("record", "start", "--server", b.name, "th", "-w",
                                    str(tmp_path)), stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stderr is not None
        assert "recording 'th'" in p.stderr.readline()     # it waits for the recorder now
        st = state("th")
        assert st is not None and st["state"] == "running"
        libc = ctypes.CDLL(None, use_errno=True)

        def interrupt(proc: subprocess.Popen[str]) -> None:
            others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
            assert others, "no thread but the main one: numpy's OpenBLAS worker is gone"
            assert libc.tgkill(proc.pid, others[0], signal.SIGINT) == 0, os.strerror(
                ctypes.get_errno())

        att = subprocess.Popen(pktipc_cmd("record", "attach", "th", "-w",
                                          str(tmp_path / "att.pcapng")), env=env)
        try:
            wait_for("attach to write", lambda: (tmp_path / "att.pcapng").exists())
            interrupt(att)
            assert att.wait(timeout=60) == 0
        finally:
            if att.poll() is None:
                att.kill()
                att.wait()
        (tmp_path / "att.pcapng").unlink()
        interrupt(p)
        assert p.wait(timeout=60) == 0
        assert "recording 'th' stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        if p.stderr:
            p.stderr.close()
    wait_for("the recorder to end", lambda: not alive(st["pid"]), timeout=30)
    assert state("th") is None
    f = tmp_path / st["files"][0]["name"]
    assert read_pcap(str(f)).error is None and isb(f)


def test_a_group_of_recordings_shares_a_replay_and_attach_writes_stdout(
        broker: Any, tmp_path: Path, recs: None) -> None:
    """Two recordings in one group (--group) share the packets of a replay:
    each packet is in exactly one of them, bytes and nanosecond times as in
    the file; `record attach -w -` writes what each holds as one pcapng
    stream on stdout."""
    from pktipc._tools.synth import write_pcap

    src = tmp_path / "src.pcap"
    with open(src, "wb") as out:
        write_pcap(out, 2000)
    b = broker("-r", str(src), "--wait-clients", "2")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name in ("ga", "gb"):
        r = start("--server", b.name, name, "-w", str(out_dir), "--group", "share",
                  "--max-size", "16k", "--files", "1000", "--detach")
        assert r.returncode == 0, r.stderr
    ended = {name: wait_for(f"{name} to end", lambda name=name: (s := state(name))
                            and s["state"] == "ended" and s, timeout=30) for name in ("ga", "gb")}
    got = []
    for name, st in ended.items():
        r = subprocess.run(pktipc_cmd("record", "attach", name, "--no-follow", "-w", "-"),
                           capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert r.stdout[:4] == b"\x0a\x0d\x0d\x0a" and not r.stderr
        f = tmp_path / f"{name}.pcapng"
        f.write_bytes(r.stdout)
        ref = read_pcap(str(f))
        assert ref.error is None and 0 < len(ref.packets) == st["packets"] < 2000
        assert st["removed"]["files"] == 0 and len(st["files"]) >= 2
        got += ref.packets
    want = read_pcap(str(src)).packets
    assert sorted((p.ts_ns, p.data) for p in got) == [(p.ts_ns, p.data) for p in want]


def _idle_broker(broker: Any, tmp_path: Path) -> BrokerProc:
    """A broker that waits for more clients than will come: it serves nothing."""
    from pktipc._tools.synth import write_pcap

    f = tmp_path / "idle.pcap"
    with open(f, "wb") as out:
        write_pcap(out, 10)
    b: BrokerProc = broker("-r", str(f), "--wait-clients", "16", "--max-recordings", "2")
    return b


def test_a_state_replaced_while_it_is_read_is_read_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorder renames a new NAME.json over the old while record attach
    or list reads it: the reader, whose file has no name left by the time it
    looks at it, reads the old state whole, and takes it for no link."""
    sd = recording.StateDir("b", create=True)
    try:
        sd.write("r", {"n": 1})
        real = os.fstat

        def fstat_after_a_write(fd: int) -> os.stat_result:
            monkeypatch.setattr(recording.os, "fstat", real)
            sd.write("r", {"n": 2})         # between the reader's open and its check
            return real(fd)

        monkeypatch.setattr(recording.os, "fstat", fstat_after_a_write)
        assert sd.read("r") == {"n": 1}
        assert sd.read("r") == {"n": 2}
        os.link(sd.path / "r.json", sd.path / "other")
        with pytest.raises(pktipc.PktipcError, match="not a plain file"):
            sd.read("r")
    finally:
        sd.close()


def test_the_broker_counts_recordings_by_name() -> None:
    """Clients named rec.NAME are recordings: one more than the quota is
    refused, a place kept for one counts, and one that leaves frees its."""
    w = World(max_recordings=2)
    a, b = w.connect("rec.a", pid=1), w.connect("rec.b", pid=2)
    other = w.connect("recorder", pid=3)                  # not a recording
    c = w.connect("rec.c", pid=4)
    for peer in (a, b, other):
        assert isinstance(w.log[peer][0], Welcomed)
    [refused] = w.log[c]
    assert isinstance(refused, RequestRefused) and refused.code == "too-many-recordings"
    assert "at most 2 recordings at once (serve --max-recordings)" in refused.text
    w.clients[a].bye(w.now)
    w.flush()
    c = w.connect("rec.c", pid=4)
    assert isinstance(w.log[c][0], Welcomed)


def test_quota_and_bad_input(broker: Any, tmp_path: Path, recs: None,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """One recording more than --max-recordings is refused, saying so; a
    stopped one frees its place. Names are unique per broker. Bad input is
    one line and a non-zero exit."""
    b = _idle_broker(broker, tmp_path)
    for name in ("a", "b"):
        r = start("--server", b.name, name, "-w", str(tmp_path), "--detach")
        assert r.returncode == 0, r.stderr
    r = start("--server", b.name, "c", "-w", str(tmp_path), "--detach")
    assert r.returncode == 1
    assert r.stderr == (f"pktipc: error: broker {b.name!r} refused 'rec.c': this broker runs "
                        "at most 2 recordings at once (serve --max-recordings); stop one first "
                        "(pktipc record stop)\n")
    assert state("c") is None
    r = start("--server", b.name, "a", "-w", str(tmp_path), "--detach")
    assert r.returncode == 1
    assert r.stderr == (f"pktipc: error: recording 'a' of broker {b.name!r} is running: "
                        "pktipc record stop a first\n")
    assert run_pktipc("record", "stop", "a").returncode == 0
    r = start("--server", b.name, "c", "-w", str(tmp_path), "--detach")
    assert r.returncode == 0, r.stderr
    assert sorted(r["name"] for r in recording.recordings()) == ["b", "c"]
    for args, message in [
        (["--server", b.name, "../x"], "recording name '../x': use 1-48 letters"),
        (["--server", b.name, "x" * 45], "at most 44 characters"),
        (["--server", b.name, "x", "--max-size", "1k"], "--max-size must be at least 4096"),
        (["--server", b.name, "x", "--files", "0"], "--files must be at least 1"),
        (["--server", b.name, "x", "--max-age", "-1"], "--max-age must be a positive"),
        (["--server", b.name, "x", "-w", str(tmp_path / "no")], "not a directory"),
        (["--server", b.name, "x", "udp and"], "bad filter 'udp and'"),
        (["--server", "nobody", "x"], "broker 'nobody' is not running"),
    ]:
        if "-w" not in args:
            args += ["-w", str(tmp_path)]
        assert cli.main(["record", "start", *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert state("x") is None
    for args, message in [(["attach", "zz"], "no recording named 'zz'"),
                          (["stop", "zz"], "no recording named 'zz'")]:
        assert cli.main(["record", *args]) == 1
        err = capsys.readouterr().err
        assert err == f"pktipc: error: {message} (see pktipc record list)\n"


def test_by_age_with_a_filter(broker: Any, tmp_path: Path, recs: None) -> None:
    """--max-age keeps the last SEC seconds: files of SEC/--files each, each
    removed once it ended more than SEC ago; a filter records only what it
    accepts (here the UDP of a replay that is TCP and UDP)."""
    from pktipc._tools.synth import write_pcap

    src = tmp_path / "src.pcap"
    with open(src, "wb") as out:
        write_pcap(out, 3000, rate_pps=1000)                # 3 s, paced
    b = broker("-r", str(src), "--realtime")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    r = start("--server", b.name, "aged", "-w", str(out_dir), "--max-age", "1", "--files", "5",
              "--detach", "udp")
    assert r.returncode == 0, r.stderr
    st = wait_for("the stream to end", lambda: (s := state("aged")) and s["state"] == "ended"
                  and s, timeout=30)
    assert st["why"] == "the broker's stream ended"
    udp = subprocess.run(["tcpdump", "-r", str(src), "-n", "udp"], capture_output=True,
                         text=True).stdout.splitlines()         # what tcpdump's filter takes
    files = kept(st)
    assert st["removed"]["files"] >= 5 and 2 <= len(files) <= 7
    closed = [f for f in st["files"] if f["closed_ns"]]
    ended = max(f["closed_ns"] for f in closed)
    assert all(ended - f["closed_ns"] <= 1.3e9 for f in closed)      # none older than kept
    got = [p for f in files for p in read_pcap(str(f)).packets]
    assert st["packets"] == st["removed"]["packets"] + len(got)
    assert 0 < st["packets"] < 3000
    rows = [row for f in files for row in subprocess.run(
        ["tshark", "-r", str(f), "-T", "fields", "-e", "udp.srcport"], capture_output=True,
        text=True).stdout.splitlines()]
    assert len(rows) == len(got) and all(rows)                          # every one is UDP
    assert len(udp) > 500 and st["packets"] == len(udp)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "tiny"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "pktipc-test", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def test_full_disk_and_lost_directory_stop_the_recording_alone(
        ns: Netns, broker: Any, tmp_path: Path, tiny_tmpfs: Path, recs: None) -> None:
    """A recording on a tmpfs that fills up stops, its last file whole and
    the reason in `record list` and its log; one whose directory is removed
    stops too; the broker and its other clients lose nothing."""
    b = serve_live(broker, ns, "-i", "va")
    gone = tmp_path / "gone"
    gone.mkdir()
    for name, where in (("full", tiny_tmpfs), ("lost", gone)):
        r = start("--server", b.name, name, "-w", str(where), "--max-size", "1M", "--detach")
        assert r.returncode == 0, r.stderr
    sent = frames(0, 1000, size=200)
    with pktipc.connect(b.name, "other") as other:
        ns.send("vb", sent[:100], tmp_path)
        wait_packets("lost", 100)
        subprocess.run(["rm", "-rf", str(gone)], check=True)
        ns.send("vb", sent[100:], tmp_path)
        got = receive(other, len(sent))
    assert [p.data for p in got] == sent
    full = wait_for("the full one to stop", lambda: (s := state("full")) and
                    s["state"] == "failed" and s)
    assert "No space left on device" in full["why"]
    lost = wait_for("the lost one to stop", lambda: (s := state("lost")) and
                    s["state"] == "failed" and s)
    assert lost["why"] == f"directory {gone} was removed"
    [f] = kept(full)
    ref = read_pcap(str(f))
    assert ref.error is None and 0 < len(ref.packets) < len(sent)
    assert [p.data for p in ref.packets] == sent[: len(ref.packets)]
    assert subprocess.run(["capinfos", str(f)], capture_output=True).returncode == 0
    log = (Path(os.environ["PKTIPC_RUNTIME_DIR"]) / f"{b.name}.recordings" / "full.log")
    assert "No space left on device" in log.read_text()
    listed = run_pktipc("record", "list")
    assert "full: failed:" in listed.stdout and "lost: failed: directory" in listed.stdout
    st = pktipc.broker_stats(b.name)
    assert st.counters.broker_drops == 0 and st.sources[0].kernel_drops == 0
    assert [c.name for c in st.clients] == []              # both recordings detached
    run_pktipc("record", "stop", "full")                   # before the tmpfs goes


def test_statistics_blocks_count_a_stalled_recordings_drops(
        ns: Netns, broker: Any, tmp_path: Path, recs: None) -> None:
    """A `drop` recording that stalls (SIGSTOP) is skipped by the broker;
    its files' statistics blocks report exactly the drops the broker
    counted against it, and with what they hold, every packet sent."""
    b = serve_live(broker, ns, "-i", "va", "--slabs", "8", "--slab-size", "64k",
                   "--block-size", "64k", "--max-clients", "4")
    r = start("--server", b.name, "slow", "-w", str(tmp_path), "--policy", "drop",
              "--max-size", "64k", "--files", "1000", "--detach")
    assert r.returncode == 0, r.stderr
    pid = state("slow")["pid"]                                         # type: ignore[index]
    sent = frames(0, 3000, size=200)
    os.kill(pid, signal.SIGSTOP)
    try:
        for i in range(0, len(sent), 100):
            ns.send("vb", sent[i : i + 100], tmp_path)
            time.sleep(0.005)
    finally:
        os.kill(pid, signal.SIGCONT)
    drops = wait_for("the broker to count drops", lambda: next(
        (c.drops for c in pktipc.broker_stats(b.name).clients if c.drops), 0))
    st = wait_for("the recording to catch up", lambda: (s := state("slow")) and
                  s["packets"] + s["drops"]["recording"] == len(sent) and s)
    assert st["drops"] == {"kernel": 0, "broker": 0, "recording": drops}
    run_pktipc("record", "stop", "slow")
    isbs = [row for f in kept(st) for row in isb(f)]
    assert len(isbs) == len(st["files"])
    assert sum(int(row[1]) for row in isbs) == drops
    assert sum(int(row[2]) for row in isbs) == st["packets"] == len(sent) - drops
    assert any(f"recording {int(row[1])}" in row[3] for row in isbs if int(row[1]))


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "killed"])
def test_recording_survives_a_broker_restart(ns: Netns, broker: Any, tmp_path: Path,
                                             recs: None, how: signal.Signals) -> None:
    """Stopped (end of stream) or killed (no answer), the broker is back
    under its name: the recording attaches to it, counts the restart, ends
    its file noting it, and records on in the next."""
    b = serve_live(broker, ns, "-i", "va")
    r = start("--server", b.name, "keep", "-w", str(tmp_path), "--detach")
    assert r.returncode == 0, r.stderr
    ns.send("vb", frames(0, 50), tmp_path)
    wait_packets("keep", 50)
    b.proc.send_signal(how)
    b.wait()
    if how == signal.SIGKILL:
        b.remove_leftovers()
    # Killed, the broker is missed after 5 heartbeats (1 s each). An attempt
    # whose WELCOME comes too late on a loaded machine leaves its place to
    # the new broker's --liveness, and the next attempts are told name-taken
    # until then.
    b2 = BrokerProc(b.name, ["-i", "va", "--block-timeout", "2", "--liveness", "10"],
                    b.runtime, ns)
    try:
        b2.wait_ready()
        wait_for("the recording to attach again", lambda: any(
            c.name == "rec.keep" for c in pktipc.broker_stats(b.name).clients), timeout=60)
        ns.send("vb", frames(50, 50), tmp_path)
        st = wait_packets("keep", 100)
        assert st["restarts"] == 1 and st["state"] == "running"
        run_pktipc("record", "stop", "keep")
    finally:
        b2.stop()
    files = kept(st)
    assert len(files) == 2
    assert [p.data for f in files for p in read_pcap(str(f)).packets] == frames(0, 100)
    [(_, _, delivered, comment)] = isb(files[0])
    assert int(delivered) == 50 and "the broker restarted" in comment
