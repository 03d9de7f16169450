"""PCAP-over-IP: real brokers, `pktipc pcap-over-ip`, and the readers on the
other end of the TCP connection: tshark reading -i TCP@HOST:PORT, plain
sockets reading the stream, a listening reader that pktipc dials."""

from __future__ import annotations

import io
import random
import socket
import struct
import subprocess
import threading
from collections import Counter
from itertools import takewhile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opshelp import synth_file
from pcapref import read_pcap
from pktipc._shm import lib
from remotehelp import Proc, procs, start
from test_groups import flow_of
from test_live import OTHER, frame, udp4

from pktipc import PKT_DTYPE, PktipcError
from pktipc._client.writer import pcap_header, records
from pktipc._errors import EndOfStream
from pktipc._net.pcapoverip import SNAPLEN, PcapOverIp, PcapOverIpOptions, _Conn
from pktipc._tools.synth import write_pcap

Record = tuple[int, int, int, bytes]        # ts in µs, caplen, wirelen, bytes


def pcap_over_ip(started: list[Proc], server: str, *extra: str) -> tuple[Proc, int]:
    p = start(started, "pcap-over-ip", "--server", server, *extra)
    m = p.wait_line(r"listening on 127\.0\.0\.1:(\d+)" if "--connect" not in extra
                    else r"sending to")
    return p, int(m[1]) if m.groups() else 0


def parse(stream: bytes) -> tuple[int, list[Record]]:
    """The link type and records of a classic little-endian µs pcap stream,
    which must end on a record's end."""
    magic, major, minor, _, _, snap, linktype = struct.unpack_from("<IHHiIII", stream)
    assert (magic, major, minor, snap) == (0xA1B2C3D4, 2, 4, 65535)
    out: list[Record] = []
    at = 24
    while at < len(stream):
        sec, usec, incl, orig = struct.unpack_from("<IIII", stream, at)
        assert usec < 1_000_000 and incl <= 65535
        out.append((sec * 1_000_000 + usec, incl, orig, stream[at + 16:at + 16 + incl]))
        at += 16 + incl
    assert at == len(stream), "a record cut short"
    return linktype, out


def expected(path: Path) -> list[Record]:
    return [(ts // 1000, cap, wire, data) for ts, cap, wire, data in
            read_pcap(str(path)).packets]


def in_order(want: list[Record], got: list[Record]) -> int:
    """How many records of `got`, from its first, are found in `want` in that
    order, each past the one before: len(got) when `got` is `want` with
    some records left out. Records may repeat (two frames alike within one
    microsecond), so a record is matched by its place, not looked up."""
    it = iter(want)
    return sum(1 for _ in takewhile(lambda r: any(r == w for w in it), got))


def read_all(port: int, rcvbuf: int | None = None) -> tuple[socket.socket, bytearray]:
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    return s, bytearray()


def drain(s: socket.socket, buf: bytearray) -> bytes:
    """Everything until the server closes the connection."""
    with s:
        while chunk := s.recv(1 << 20):
            buf += chunk
    return bytes(buf)


def test_tshark_reads_every_packet(broker: Any, tmp_path: Path) -> None:
    """tshark -i TCP@127.0.0.1:PORT captures the stream live: every packet,
    decoded as tshark decodes the file itself, times to the µs."""
    path = synth_file(tmp_path / "src.pcap", 5000, 1e5)
    b = broker("-r", str(path))
    fields = ["-T", "fields", "-e", "frame.time_epoch", "-e", "frame.len", "-e",
              "frame.cap_len", "-e", "frame.protocols", "-e", "ip.src", "-e", "ip.dst",
              "-e", "tcp.srcport", "-e", "udp.srcport", "-e", "vlan.id"]
    env = {"TMPDIR": str(tmp_path), "PATH": "/usr/bin:/bin"}   # where tshark keeps its file
    with procs() as started:
        poi, port = pcap_over_ip(started, b.name)
        live = subprocess.run(["tshark", "-i", f"TCP@127.0.0.1:{port}", *fields],
                              capture_output=True, text=True, timeout=120, env=env)
        poi.wait_line(r"end of the stream, after 5000 packets")
    assert live.returncode == 0, live.stderr
    assert "5000 packets captured" in live.stderr
    ref = subprocess.run(["tshark", "-r", str(path), *fields], capture_output=True, text=True,
                         timeout=120, env=env, check=True).stdout
    got_lines = live.stdout.splitlines()
    ref_lines = ref.splitlines()
    assert len(got_lines) == len(ref_lines) == 5000

    def us(line: str) -> list[str]:         # ns to µs: the last three digits cut
        t, *rest = line.split("\t")
        return [t[:-3], *rest]
    assert [us(x) for x in got_lines] == [us(x) for x in ref_lines]
    assert b.wait() == 0


def test_two_connections_of_a_group_split_the_flows(broker: Any, tmp_path: Path) -> None:
    """Two readers on one port, --group: every packet exactly once between
    them, each flow (both directions) whole to one of them."""
    path = tmp_path / "flows.pcap"
    with open(path, "wb") as f:
        write_pcap(f, 20000, flows=300, seed=5, sizes=(64, 128, 700), skew=None)
    want = expected(path)
    b = broker("-r", str(path), "--wait-clients", "2", "--slab-size", "64k")
    with procs() as started:
        poi, port = pcap_over_ip(started, b.name, "--group", "zeek")
        streams: list[bytes] = [b"", b""]
        conns = [read_all(port), read_all(port)]

        def reader(i: int) -> None:
            streams[i] = drain(*conns[i])
        threads = [threading.Thread(target=reader, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert poi.text().count("of group 'zeek'") == 2
    parts = [parse(s) for s in streams]
    assert all(lt == 1 for lt, _ in parts)
    a, z = parts[0][1], parts[1][1]
    assert a and z
    assert Counter(a) + Counter(z) == Counter(want)              # exactly once
    for got in (a, z):                                            # in order
        assert in_order(want, got) == len(got)
    flows_a = {flow_of(r[3]) for r in a}
    flows_z = {flow_of(r[3]) for r in z}
    assert not flows_a & flows_z                                  # each flow whole
    assert b.wait() == 0


def test_a_stalled_reader_under_drop_costs_the_other_nothing(broker: Any,
                                                             tmp_path: Path) -> None:
    """A reader that reads nothing, its connection a `drop` client: the broker
    skips it and ends the stream while it still stalls, the other connection
    having had every packet; once it reads, it gets a valid stream whose
    packets and counted gaps make up the whole."""
    path = synth_file(tmp_path / "src.pcap", 20000, 1e6)
    want = expected(path)
    b = broker("-r", str(path), "--wait-clients", "2", "--slab-size", "64k", "--slabs", "8")
    with procs() as started:
        stalled_poi, sport = pcap_over_ip(started, b.name, "--listen", "127.0.0.1:0",
                                          "--policy", "drop", "--credit", "1")
        good_poi, gport = pcap_over_ip(started, b.name, "--listen", "127.0.0.1:0",
                                       "--policy", "block")
        stalled = read_all(sport, rcvbuf=4096)
        stalled_poi.wait_line("attached as client")
        good = drain(*read_all(gport))          # to its end: the whole stream served
        assert stalled_poi.text().count("end of the stream") == 0   # while this one stalls
        late = drain(*stalled)
        m = stalled_poi.wait_line(r"end of the stream, after (\d+) packets; (\d+) packets in "
                                  r"(\d+) gaps")
    assert parse(good)[1] == want
    got = parse(late)[1]
    assert int(m[1]) == len(got) and int(m[2]) > 0
    assert len(got) + int(m[2]) == len(want)
    assert in_order(want, got) == len(got)
    assert b.wait() == 0


def test_connect_to_a_listening_reader(broker: Any, tmp_path: Path) -> None:
    """--connect HOST:PORT: nobody listens at first, so pktipc dials again;
    then a reader listens and gets the whole stream."""
    path = synth_file(tmp_path / "src.pcap", 3000, 1e5)
    b = broker("-r", str(path))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]            # reserved, not yet listening: refused
    with listener, procs() as started:
        poi, _ = pcap_over_ip(started, b.name, "--connect", f"127.0.0.1:{port}")
        poi.wait_line(rf"127\.0\.0\.1:{port}: ECONNREFUSED; trying again")
        listener.listen(1)
        conn, _ = listener.accept()
        got = drain(conn, bytearray())
        poi.wait_line(r"end of the stream, after 3000 packets")
    linktype, records = parse(got)
    assert linktype == 1 and records == expected(path)
    assert b.wait() == 0


def test_bad_input_is_one_line() -> None:
    from conftest import run_pktipc

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    with taken:
        port = taken.getsockname()[1]
        for args, want in ((["--listen", f"127.0.0.1:{port}"], "Address already in use"),
                           (["--listen", "127.0.0.1:99999"], "give HOST:PORT"),
                           (["--connect", "nohost"], "give HOST:PORT")):
            r = run_pktipc("pcap-over-ip", "--server", "x", *args)
            assert r.returncode != 0, args
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
            assert want in r.stderr, r.stderr


def test_the_order_check_takes_records_alike() -> None:
    """The synthetic captures at 1e6 packets/s hold frames alike within one
    microsecond; a reader that lost the batch holding one of two such
    records is still in order."""
    a, b, c, d = ((i, 60, 60, bytes([i]) * 60) for i in range(4))
    assert in_order([a, b, b, c, d], [a, b, d]) == 3             # the other b lost
    assert in_order([a, b, b, c, d], [b, b, c]) == 3
    assert in_order([a, b, c], [a, c, b]) == 2                    # out of order
    assert in_order([a, b, c], [a, b, b]) == 2                    # more than there were


T_END = 2**32 * 10**9       # pcap's seconds are an unsigned 32-bit count


def _batch(frames: list[tuple[int, bytes, int]]) -> tuple[np.ndarray[Any, Any], bytes]:
    """Descriptors and a slab (as the broker lays them out) of frames given
    as (time in ns, bytes, wire length)."""
    desc = np.zeros(len(frames), dtype=PKT_DTYPE)
    slab = bytearray(32 * len(frames))
    for i, (ts, data, wire) in enumerate(frames):
        desc[i]["data_off"] = len(slab)
        desc[i]["caplen"], desc[i]["wirelen"] = len(data), wire
        desc[i]["ts_ns"] = ts
        desc[i]["linktype"] = 1
        slab += data + b"\0" * (-len(data) % 8)
    return desc, bytes(slab)


def test_c_records_are_what_the_format_defines(tmp_path: Path) -> None:
    """One batch's records, as pcap-over-ip builds them (one C call), read
    back by libpcap: microseconds truncated from the nanoseconds, up to the
    last microsecond pcap can hold; a frame longer than the snap length cut
    there, its wire length kept; a VLAN tag as it is in the frame; only the
    packets asked for, in the order asked."""
    big = frame(OTHER, udp4(1, 2, 1000)[:28] + bytes(range(256)) * 273)[:70_000]   # a GRO frame
    vlan = frame(OTHER, udp4(3, 4, 50), (0x8100, 0x2064))
    plain = frame(OTHER, udp4(5, 6, 20))
    frames = [(0, plain, len(plain)),                       # 1970-01-01 00:00:00.000000
              (999, vlan, len(vlan)),                       # 999 ns: 0 µs
              (1_700_000_000_123_456_789, big, 70_000),
              (5, plain, len(plain)),                       # not asked for
              (T_END - 1, vlan, len(vlan) + 100),           # 2106-02-07 06:28:15.999999
              (2**31 * 10**9 + 1000, plain[:30], len(plain)),   # past 2038, captured short
              (1_999_999_999, big[:65_535], 70_000)]
    desc, slab = _batch(frames)
    idx = np.array([0, 1, 2, 4, 5, 6], dtype=np.uint32)
    size = sum(16 + min(len(frames[i][1]), SNAPLEN) for i in idx)
    out = bytearray(size + 5)
    data = records(lib.CAPW_PCAP_US, desc, slab, idx, out, size, snaplen=SNAPLEN)
    assert len(data) == size
    path = tmp_path / "batch.pcap"
    path.write_bytes(pcap_header(1, SNAPLEN, micro=True) + data)
    ref = read_pcap(str(path))
    assert ref.error is None and ref.linktype == 1
    want = [(ts // 1000 * 1000, min(len(f), SNAPLEN), wire, f[:SNAPLEN])
            for ts, f, wire in (frames[i] for i in idx)]
    assert [tuple(p) for p in ref.packets] == want
    assert ref.packets[3].ts_ns == T_END - 1000 and ref.packets[2].caplen == 65_535
    for bad in (-1, T_END):                 # times pcap cannot hold: refused
        desc[1]["ts_ns"] = bad
        with pytest.raises(PktipcError):
            records(lib.CAPW_PCAP_US, desc, slab, idx, out, size, snaplen=SNAPLEN)


class _Sock:
    """Takes at most a few bytes per send, sometimes none (EAGAIN)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.got = bytearray()

    def send(self, data: memoryview) -> int:
        k = self.rng.choice((0, 1, 7, 100, 3000, 1 << 20))
        if not k:
            raise BlockingIOError
        self.got += data[:k]
        return min(k, len(data))


class _Batch:
    def __init__(self, desc: np.ndarray[Any, Any], slab: bytes, released: list[int],
                 seq: int) -> None:
        self.descriptors, self.slab, self.released, self.seq = desc, slab, released, seq
        self.mine = np.arange(len(desc), dtype=np.uint32)

    def buffer(self) -> memoryview:
        return memoryview(self.slab)

    def release(self) -> None:
        self.released.append(self.seq)


class _Client:
    def __init__(self, batches: list[_Batch]) -> None:
        self.batches, self.gaps = batches, []
        self.ready = 0              # batches that came so far

    def next_batch(self, timeout: float) -> _Batch | None:
        if self.batches and self.ready:
            self.ready -= 1
            return self.batches.pop(0)
        if not self.batches:
            raise EndOfStream(None)
        return None

    def close(self) -> None:
        pass


@pytest.mark.parametrize("seed", range(5))
def test_a_slow_connection_gets_its_batches_whole_and_in_order(seed: int) -> None:
    """A connection's queue driven by hand: batches come while others wait
    to be written, a send takes a few bytes or none; the stream is every
    batch's records in order (each batch's records in a buffer of their
    own, not one reused while the last is still queued), each batch
    released once its last byte is sent, in order."""
    rng = random.Random(seed)
    batches: list[_Batch] = []
    want, ends, released = bytearray(), [], []
    ts = 1_700_000_000_000_000_000
    for seq in range(40):
        frames = []
        for _ in range(rng.randrange(1, 30)):
            ts += rng.randrange(1, 5000)
            f = frame(OTHER, udp4(seq, 9, rng.randrange(10, 1400)))
            frames.append((ts, f, len(f)))
        desc, slab = _batch(frames)
        batches.append(_Batch(desc, slab, released, seq))
        for t, f, wire in frames:
            want += struct.pack("<IIII", t // 10**9, t % 10**9 // 1000, len(f), wire) + f
        ends.append(len(want))
    p = PcapOverIp(PcapOverIpOptions(server="x", connect=[("127.0.0.1", 9)]), log=io.StringIO())
    sock = _Sock(rng)
    client = _Client(batches)
    c = _Conn(sock, ("127.0.0.1", 9), "t", client=client)    # type: ignore[arg-type]
    while not c.ended or c.out:
        client.ready += rng.choice((0, 0, 1, 2))
        p._take(c)
        p._write(c)
        assert all(ends[seq] <= len(sock.got) for seq in released)
    assert bytes(sock.got) == bytes(want)
    assert released == list(range(40))
