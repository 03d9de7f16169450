"""Bad input: one clear line on stderr, a non-zero exit, no traceback, no
hang, and the broker keeps serving everyone else."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import PCAPS, run_pktipc, segments
from pcapref import read_pcap

import pktipc
from pktipc import _protocol as proto

DNS = PCAPS / "dns_udp.pcap"
MANY = PCAPS / "DECnet_Phone.pcap"


def one_line_error(r, *needles: str) -> None:
    assert r.returncode != 0
    err = r.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("pktipc: error:"), err
    for n in needles:
        assert n in err, err


def test_missing_file() -> None:
    r = run_pktipc("serve", "--name", "x1", "-r", "/nonexistent/file.pcap")
    one_line_error(r, "/nonexistent/file.pcap", "No such file")


def test_not_a_capture(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("these are not packets\n" * 20)
    r = run_pktipc("serve", "--name", "x2", "-r", str(f))
    one_line_error(r, str(f), "format")


def test_directory_and_empty_file(tmp_path: Path) -> None:
    one_line_error(run_pktipc("serve", "--name", "x3", "-r", str(tmp_path)), "directory")
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    one_line_error(run_pktipc("serve", "--name", "x3", "-r", str(empty)), str(empty))


def test_link_type_beyond_16_bits(tmp_path: Path) -> None:
    """A link type is 16 bits in the formats and in a descriptor; libpcap 1.10
    passes on the reserved bits of a classic header's field as well."""
    f = tmp_path / "reserved.pcap"
    f.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 0x00010001)
                  + struct.pack("<IIII", 1, 0, 4, 4) + b"abcd")
    r = run_pktipc("serve", "--name", "x-linktype", "-r", str(f))
    one_line_error(r, str(f), "link type 0x10001 is not a 16-bit LINKTYPE_ value")


def test_second_file_bad_refuses_before_start(tmp_path: Path, runtime_dir: Path) -> None:
    r = run_pktipc("serve", "--name", "x4", "-r", str(DNS), "-r", str(tmp_path / "nope.pcap"))
    one_line_error(r, "nope.pcap")
    assert not (runtime_dir / "x4.ctl").exists()
    assert segments("x4") == []


def test_truncated_capture(broker, tmp_path: Path) -> None:
    """Packets before the cut are served; then the stream ends with libpcap's
    complaint, and both the broker and dump exit non-zero."""
    ref = read_pcap(str(MANY))
    data = MANY.read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[: len(data) - 30])
    want = read_pcap(str(cut))
    assert want.error and "truncated" in want.error
    b = broker("-r", str(cut))
    out = tmp_path / "out.pcap"
    r = run_pktipc("dump", "--server", b.name, "-w", str(out))
    one_line_error(r, "truncated")
    assert b.wait() == 1
    assert "truncated" in b.stderr()
    got = read_pcap(str(out))
    assert got.error is None
    assert got.packets == want.packets and len(got.packets) == len(ref.packets) - 1


def test_a_capture_truncated_in_place_while_served(broker, tmp_path: Path) -> None:
    """A capture the broker has mapped, truncated in place (not replaced)
    while it is served: no SIGBUS; the packets the file still holds are
    served, then the stream ends with libpcap's complaint about the cut."""
    import struct

    f = tmp_path / "shrinking.pcap"
    rec = 16 + 1000
    with open(f, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(20_000):
            out.write(struct.pack("<IIII", 1_700_000_000, i, 1000, 1000)
                      + i.to_bytes(4, "little") + bytes(996))
    b = broker("-r", str(f), "--slab-size", "64k", "--slabs", "4", "--credit", "1")
    with pktipc.connect(b.name, "c") as c:
        first = c.next_batch(timeout=10)      # the broker reads the mapping now
        assert first is not None
        got = [bytes(p.data[:4]) for p in first]
        first.release()
        os.truncate(f, 24 + 5000 * rec + 500)   # in the middle of packet 5001
        want = read_pcap(str(f))
        got += [bytes(p.data[:4]) for p in c.packets(timeout=10)]
    assert got == [p.data[:4] for p in want.packets] and len(got) == 5000
    assert want.error and c.end_error == f"{f}: {want.error}"
    assert b.wait() == 1
    assert f"pktipc: error: {f}: truncated dump file" in b.stderr()


def test_unknown_option() -> None:
    r = run_pktipc("serve", "--name", "x5", "-r", str(DNS), "--frobnicate")
    assert r.returncode == 2
    one_line_error(r, "--frobnicate")


@pytest.mark.parametrize("args", [["--slab-size", "1000"], ["--slabs", "1"],
                                  ["--speed", "0"], ["--credit", "0"], ["--name", "a/b"],
                                  ["--slab-size", "lots"], ["--max-clients", "0"],
                                  ["--max-clients", "1025"]])
def test_bad_values(args: list[str]) -> None:
    r = run_pktipc("serve", "--name", "x6", "-r", str(DNS), *args)
    one_line_error(r)


def test_broker_not_running() -> None:
    r = run_pktipc("dump", "--server", "nobody-here", "-w", "-")
    one_line_error(r, "nobody-here", "not running")
    with pytest.raises(pktipc.BrokerNotRunning):
        pktipc.connect("nobody-here", "c")
    r = run_pktipc("status", "nobody-here")
    assert r.returncode == 1 and "not running" in r.stdout


def test_stale_socket_is_not_a_broker(runtime_dir: Path) -> None:
    """A socket file whose broker died (nobody listening) fails fast."""
    import socket

    path = runtime_dir / "ghost.ctl"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()
    t = time.monotonic()
    with pytest.raises(pktipc.BrokerNotRunning):
        pktipc.connect("ghost", "c", timeout=1.0)
    assert time.monotonic() - t < 5


def test_duplicate_client_name(broker) -> None:
    b = broker("-r", str(DNS), "--wait-clients", "2")
    with pktipc.connect(b.name, "same"):
        with pytest.raises(pktipc.NameTaken) as e:
            pktipc.connect(b.name, "same")
        assert "same" in str(e.value) and isinstance(e.value, pktipc.PktipcError)
        r = run_pktipc("dump", "--server", b.name, "--client", "same", "-w", "-")
        one_line_error(r, "already attached")
        # The name is free again once its owner leaves.
    with pktipc.connect(b.name, "same"):
        pass


def test_refuses_second_broker_of_same_name(broker) -> None:
    b = broker("-r", str(DNS))
    r = run_pktipc("serve", "--name", b.name, "-r", str(DNS))
    one_line_error(r, "already running", str(b.pid))


def test_malformed_control_messages(broker) -> None:
    """Garbage from a raw ZeroMQ socket gets an ERROR reply and a counter;
    a well-behaved client attached meanwhile receives every packet."""
    want = read_pcap(str(MANY)).packets
    b = broker("-r", str(MANY), "--wait-clients", "2")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"ipc://{b.socket}")
    try:
        with pktipc.connect(b.name, "good") as good:
            bad_frames = [
                b"\xc1garbage",
                msgpack.packb([1, 2, 3]),
                msgpack.packb({"t": "hello", "v": 99}),
                msgpack.packb({"t": "hello", "v": proto.VERSION, "name": 7, "group": None,
                               "policy": None, "credit": None, "pid": 1, "balance": None}),
                msgpack.packb({"t": "release", "v": proto.VERSION, "seqs": [0]}),
                msgpack.packb({"t": "launch", "v": proto.VERSION}),
                b"x" * 100_000,
            ]
            codes = []
            for frame in bad_frames:
                raw.send(frame)
                assert raw.poll(5000), "no ERROR reply"
                reply = msgpack.unpackb(raw.recv())
                assert reply["t"] == "error"
                codes.append(reply["code"])
            raw.send_multipart([b"two", b"frames"])
            assert raw.poll(5000)
            codes.append(msgpack.unpackb(raw.recv())["code"])
            assert codes == ["malformed", "malformed", "version", "bad-field", "not-attached",
                             "unknown-type", "too-large", "malformed"]
            stats = good.stats()
            assert stats.counters.protocol_errors >= len(codes)
            # The second client attaches; the replay starts and `good` gets it all.
            with pktipc.connect(b.name, "other") as other:
                got = [(p.ts_ns, p.caplen, p.wirelen, bytes(p.data))
                       for p in good.packets(timeout=10)]
                assert len(list(other.packets(timeout=10))) == len(want)
            assert got == want
    finally:
        raw.close()
        ctx.term()
    assert b.wait() == 0


def test_sigint_cleans_up(broker, runtime_dir: Path) -> None:
    b = broker("-r", str(DNS), "--wait-clients", "2")
    with pktipc.connect(b.name, "c1") as c:
        assert segments(b.name)
        b.proc.send_signal(signal.SIGINT)
        with pytest.raises(pktipc.EndOfStream) as e:
            while True:
                c.next_batch(timeout=10)
        assert "stopped" in str(e.value)
        assert b.wait(timeout=10) == 0
    assert segments(b.name) == []
    assert not b.socket.exists()
    assert not (runtime_dir / f"{b.name}.lock").exists()


def test_stop_with_busy_client_sends_end_of_stream(broker, tmp_path: Path) -> None:
    """Ctrl-C while a client still has batches queued: it is told at once."""
    b = broker("-r", str(MANY), "--loop", "0", "--slabs", "4", "--slab-size", "4k")
    with pktipc.connect(b.name, "busy", credit=1) as c:
        first = c.next_batch(timeout=10)
        assert first is not None        # held: the ring fills up behind it
        b.proc.send_signal(signal.SIGINT)
        t = time.monotonic()
        with pytest.raises(pktipc.EndOfStream) as e:
            first.release()
            while True:
                batch = c.next_batch(timeout=10)
                assert batch is not None
                batch.release()
        assert "stopped" in str(e.value) and time.monotonic() - t < 5
    assert b.wait() == 0
    assert b.stderr().strip().splitlines()[-1] == "pktipc: stopped"


def test_empty_capture_with_endless_loop_ends(tmp_path: Path, runtime_dir: Path) -> None:
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(DNS.read_bytes()[:24])        # a header and no packet
    r = run_pktipc("serve", "--name", "x7", "-r", str(empty), "--loop", "0",
                   "--wait-clients", "0", timeout=20)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "pktipc: error: the capture files hold no packet: nothing to loop over")
    assert segments("x7") == [] and not (runtime_dir / "x7.ctl").exists()


def test_dotted_name_spares_the_other_broker(broker) -> None:
    """Starting broker "a" must not remove the segment of a live "a.b"."""
    first = broker("-r", str(DNS), "--wait-clients", "2")
    second = broker("-r", str(DNS), "--wait-clients", "2", ready=False)
    second.proc.kill()
    second.proc.wait()
    r = run_pktipc("serve", "--name", first.name.rsplit("-", 1)[0], "-r", str(DNS),
                   "--wait-clients", "0")
    assert r.returncode == 0, r.stderr
    assert segments(first.name), "a live broker's segment was removed"
    with pktipc.connect(first.name, "c"):
        pass


@pytest.mark.parametrize("args", [["--credit", "0"], ["--credit", "100000"]])
def test_dump_bad_values(broker, args: list[str]) -> None:
    r = run_pktipc("dump", "--server", "whatever", "-w", "-", *args)
    one_line_error(r, "credit")


@pytest.mark.parametrize("speed", ["nan", "inf", "1e300", "-1"])
def test_bad_speed(speed: str) -> None:
    one_line_error(run_pktipc("serve", "--name", "x8", "-r", str(DNS), "--speed", speed),
                   "--speed")


def test_shared_memory_too_small(tmp_path: Path) -> None:
    """A /dev/shm too small for the ring: refused at start, nothing left behind."""
    script = (f"mount -t tmpfs -o size=8m tmpfs /dev/shm && "
              f"{sys.executable} -m pktipc serve --name x9 -r {DNS} --wait-clients 0; "
              f"echo rc=$?; ls /dev/shm")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert "rc=1" in r.stdout, r.stdout + r.stderr
    assert "pktipc." not in r.stdout.split("rc=1", 1)[1]
    err = [line for line in r.stderr.splitlines() if line.startswith("pktipc:")]
    assert len(err) == 1 and "shared memory" in err[0] and "--slabs" in err[0], r.stderr


def test_a_frame_over_the_size_limit_is_counted(broker) -> None:
    """libzmq closes a connection that sends a frame over 1 MiB, telling
    nobody: the broker notices its client gone though its process lives,
    says why, and counts it."""
    import zmq

    from pktipc import _protocol as proto
    b = broker("-r", str(DNS), "--wait-clients", "2", "--linger", "--heartbeat", "0.2",
               "--liveness", "5")
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    try:
        s.connect(f"ipc://{b.socket}")
        s.send(proto.encode("hello", name="big", group=None, policy=None, credit=None, pid=0,
                            balance=None))
        assert s.poll(5000) and proto.decode(s.recv(), proto.MAX_BROKER_FRAME)[0] == "welcome"
        s.send(proto.encode("heartbeat"))
        s.send(b"\x80" * (2 << 20))
        deadline = time.monotonic() + 10
        while pktipc.broker_stats(b.name).control.connections_dropped < 1:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert pktipc.broker_stats(b.name).clients == ()
    finally:
        s.close()
        ctx.term()
    b.stop()
    assert ("client 'big' dropped: its connection was closed under it, its process alive: a "
            "frame over 1 MiB, or a broken ZeroMQ stream") in b.stderr()
