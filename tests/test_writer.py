"""The capture-file writer: pcapng and pcap records built in C from a
batch, read back by libpcap and tshark; a rolling set of files within a
size bound; a disk that fills up; tcpdump's -C, -G and -W names and
`pktipc dump` with them; the recording filter; reading pcapng files back
as one stream."""

from __future__ import annotations

import errno
import io
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import run_pktipc
from pcapref import read_pcap
from pktipc._shm import lib
from test_live import BCAST, MCAST, OTHER, frame, udp4

from pktipc import PKT_DTYPE, PktipcError
from pktipc._client import pcapng
from pktipc._client.writer import (
    CaptureFilter,
    CaptureWriter,
    FileInfo,
    IfaceStats,
    RollingWriter,
    RotationLimit,
    TcpdumpFiles,
    WriteFailed,
)
from pktipc._layout import Iface
from pktipc._tools.synth import write_pcap

T0 = 1_700_000_000_123_456_789
IFACES = [Iface("eth0", 1, 262144, kind=lib.PKTIPC_IFACE_LIVE)]


def batch(frames: list[bytes], dirs: list[int] | None = None,
          t0: int = T0) -> tuple[np.ndarray[Any, Any], bytearray]:
    """Descriptors and a slab holding `frames`, as the broker lays them out."""
    n = len(frames)
    desc = np.zeros(n, dtype=PKT_DTYPE)
    slab = bytearray(32 * n)
    for i, f in enumerate(frames):
        desc[i]["data_off"] = len(slab)
        slab += f + b"\0" * (-len(f) % 8)
    desc["caplen"] = desc["wirelen"] = [len(f) for f in frames]
    desc["linktype"] = 1
    desc["ts_ns"] = t0 + np.arange(n) * 1001
    if dirs is not None:
        desc["flags"] = np.array(dirs) << lib.PKTIPC_F_DIR_SHIFT
    return desc, slab


def numbered(n: int, start: int = 0, size: int = 100) -> list[bytes]:
    return [frame(OTHER, udp4(1, 2, size)[:28] + struct.pack("!I", i) + bytes(size - 4))
            for i in range(start, start + n)]


def tshark(path: Path, *fields: str) -> list[list[str]]:
    args = ["tshark", "-r", str(path), "-T", "fields"]
    for f in fields:
        args += ["-e", f]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


def test_pcapng_records_with_directions(tmp_path: Path) -> None:
    """Every byte and nanosecond as given; the direction and reception type
    where the descriptor knows them (none where it does not); one interface
    block naming the source, nanosecond resolution; a statistics block."""
    frames = [frame(OTHER, udp4(1, 2, n)) for n in (1, 2, 3, 4, 5, 6, 7)]
    dirs = [lib.PKTIPC_DIR_HOST, lib.PKTIPC_DIR_BROADCAST, lib.PKTIPC_DIR_MULTICAST,
            lib.PKTIPC_DIR_OTHERHOST, lib.PKTIPC_DIR_OUTGOING, lib.PKTIPC_DIR_UNKNOWN,
            lib.PKTIPC_DIR_OUTGOING + 1]      # a value no direction has (yet)
    desc, slab = batch(frames, dirs)
    path = tmp_path / "x.pcapng"
    with open(path, "wb") as out:
        w = CaptureWriter(out, IFACES, "pcapng", comment="a comment")
        w.write(desc, slab, np.array([0, 1, 2], dtype=np.uint32))
        w.write(desc, slab, np.array([3, 4, 5, 6], dtype=np.uint32))
        w.statistics({0: IfaceStats(received=9, dropped=3, delivered=7, comment="c")}, T0, T0)
        w.finish()
        assert w.size == out.tell() == path.stat().st_size
    ref = read_pcap(str(path))
    assert ref.error is None
    assert [(p.data, p.ts_ns) for p in ref.packets] == [
        (f, T0 + 1001 * i) for i, f in enumerate(frames)]
    rows = tshark(path, "frame.interface_name", "frame.packet_flags_direction",
                  "frame.packet_flags_reception_type")
    assert rows == [["eth0", "0x00000001", "1"], ["eth0", "0x00000001", "3"],
                    ["eth0", "0x00000001", "2"], ["eth0", "0x00000001", "4"],
                    ["eth0", "0x00000002", "0"], ["eth0", "", ""], ["eth0", "", ""]]
    info = subprocess.run(["capinfos", str(path)], capture_output=True, text=True).stdout
    assert "Capture comment:     a comment" in info
    assert "Capture application: pktipc" in info
    assert "Time precision = nanoseconds (9)" in info
    assert "Number of stat entries = 1" in info


def test_pcap_records_and_a_descriptor_outside_the_slab(tmp_path: Path) -> None:
    frames = numbered(50)
    desc, slab = batch(frames)
    out = io.BytesIO()
    w = CaptureWriter(out, IFACES, "pcap")
    w.write(desc, slab)
    path = tmp_path / "x.pcap"
    path.write_bytes(out.getvalue())
    assert [p.data for p in read_pcap(str(path)).packets] == frames
    desc[3]["data_off"] = len(slab) - 10
    with pytest.raises(PktipcError, match="outside its batch"):
        CaptureWriter(io.BytesIO(), IFACES, "pcapng").write(desc, slab)


def _rolling(tmp_path: Path, max_size: int | None, files: list[Path],
             opener: Any = None, **kw: Any) -> RollingWriter:
    def open_file(number: int, now_ns: int) -> tuple[Any, str]:
        p = tmp_path / f"f{number:03d}.pcapng"
        files.append(p)
        return (opener or (lambda q: open(q, "wb", buffering=0)))(p), p.name

    def statistics(info: FileInfo, w: CaptureWriter) -> dict[int, IfaceStats]:
        return {0: IfaceStats(received=int(w.delivered[0]), dropped=0,
                              delivered=int(w.delivered[0]))}
    return RollingWriter(open_file, IFACES, "pcapng", max_size=max_size,
                         statistics=statistics, **kw)


def test_rolling_files_never_pass_their_size(tmp_path: Path) -> None:
    frames = numbered(1000)
    files: list[Path] = []
    rw = _rolling(tmp_path, 8192, files)
    rw.start()
    for i in range(0, 1000, 170):            # batches that straddle files
        desc, slab = batch(frames[i : i + 170], t0=T0 + i * 1001)
        rw.write(desc, slab)
    rw.close()
    assert rw.packets == 1000 and len(files) > 10
    got = []
    for f in files:
        assert 8192 - 600 < f.stat().st_size <= 8192 or f == files[-1]
        ref = read_pcap(str(f))
        assert ref.error is None
        got += [p.data for p in ref.packets]
    assert got == frames


class _Full(io.FileIO):
    """A file on a disk with `room` bytes left."""

    def __init__(self, path: Path, room: int) -> None:
        super().__init__(path, "wb")
        self.room = room

    def write(self, b: Any) -> int:
        left = self.room - self.tell()
        if left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(memoryview(b)[:left])


@pytest.mark.parametrize("room", [300, 5000, 5999, 20_000])
def test_a_full_disk_ends_the_file_whole(tmp_path: Path, room: int) -> None:
    """The file ends at its last whole record, with its statistics block if
    there is room, and says so; nothing is written after."""
    frames = numbered(200)
    files: list[Path] = []
    rw = _rolling(tmp_path, None, files, opener=lambda p: _Full(p, room))
    rw.start()
    desc, slab = batch(frames)
    with pytest.raises(WriteFailed, match="f001.pcapng: No space left on device"):
        rw.write(desc, slab)
    with pytest.raises(WriteFailed):
        rw.write(desc, slab)
    rw.close()
    [f] = files
    ref = read_pcap(str(f))
    assert ref.error is None and f.stat().st_size <= room
    assert [p.data for p in ref.packets] == frames[: rw.packets]
    assert rw.packets == len(ref.packets) and (room < 1000 or rw.packets > 0)
    info = subprocess.run(["capinfos", str(f)], capture_output=True, text=True)
    assert info.returncode == 0
    if room > 1000:
        assert "Number of stat entries = 1" in info.stdout


def test_tcpdump_names() -> None:
    def names(files: TcpdumpFiles, n: int, every: float = 0) -> list[str]:
        return [files.name(i + 1, int(i * every * 1e9)) for i in range(n)]
    assert names(TcpdumpFiles("f", by_size=True), 4) == ["f", "f1", "f2", "f3"]
    assert names(TcpdumpFiles("f", by_size=True, ring=3), 5) == ["f0", "f1", "f2", "f0", "f1"]
    assert names(TcpdumpFiles("f", by_size=True, ring=11), 2) == ["f00", "f01"]
    g = TcpdumpFiles("f-%Y", by_size=False, every=60, ring=2)
    assert names(g, 2, every=60) == ["f-1970", "f-1970"]
    with pytest.raises(RotationLimit, match="maximum file limit reached: 2"):
        g.name(3, int(120e9))
    gc = TcpdumpFiles("g", by_size=True, every=60)
    assert [gc.name(1, 0), gc.name(2, 1), gc.name(3, int(61e9)), gc.name(4, int(62e9))] == [
        "g", "g1", "g", "g1"]


def test_capture_filter() -> None:
    frames = [frame(OTHER, udp4(1000 + i, 53 if i % 3 else 80, 10)) for i in range(30)]
    frames += [frame(BCAST, udp4(5, 53, 10), (0x8100, 7)), frame(MCAST, b"\0" * 46)]
    desc, slab = batch(frames)
    idx = np.arange(len(frames), dtype=np.uint32)
    got = CaptureFilter("udp port 53").select(desc, slab, idx).tolist()
    assert got == [i for i in range(30) if i % 3]
    assert CaptureFilter("vlan 7").select(desc, slab, idx).tolist() == [30]
    assert CaptureFilter("udp").select(desc, slab, idx[::2]).tolist() == list(range(0, 30, 2))
    with pytest.raises(ValueError, match="bad filter 'udp and'"):
        CaptureFilter("udp and").check([1])


def _file(frames: list[bytes], ifaces: list[Iface], t0: int = T0) -> bytes:
    out = io.BytesIO()
    w = CaptureWriter(out, ifaces, "pcapng")
    desc, slab = batch(frames, t0=t0)
    desc["iface"] = np.arange(len(frames)) % len(ifaces)
    w.write(desc, slab)
    w.statistics({i: IfaceStats(delivered=1) for i in range(len(ifaces))}, t0, t0)
    return out.getvalue()


def test_files_merged_into_one_stream(tmp_path: Path) -> None:
    """Each interface block once, packets and statistics renumbered, a
    block taken only once whole."""
    a, b = Iface("a", 1, 65535), Iface("b", 1, 65535)
    one, two = numbered(4), numbered(4, start=4)
    f1, f2 = _file(one, [a, b]), _file(two, [b, a], t0=T0 + 10_000)
    m = pcapng.Merger()
    parts = [pcapng.section_header("merged")]
    r1 = m.file()
    parts += [r1.feed(f1[:100]), r1.feed(f1[100:-3]), r1.feed(f1[-3:])]
    assert not r1.pending and r1.offset == len(f1)
    parts.append(m.file().feed(f2))
    path = tmp_path / "m.pcapng"
    path.write_bytes(b"".join(parts))
    assert m.packets == 8
    rows = tshark(path, "frame.interface_name")
    assert [r[0] for r in rows] == ["a", "b", "a", "b", "b", "a", "b", "a"]
    assert [p.data for p in read_pcap(str(path)).packets] == one + two
    with pytest.raises(PktipcError, match="not a little-endian pcapng file"):
        m.file().feed(f1[:8] + f1[8:12][::-1] + f1[12:])
    with pytest.raises(PktipcError, match="a pcapng block of 13 bytes: the file is damaged"):
        m.file().feed(f1[:4] + struct.pack("<I", 13) + f1[8:])


# -- pktipc dump -C -G -W ----------------------------------------------------------


def _serve_file(broker: Any, tmp_path: Path, n: int, *args: str, rate: float = 1000) -> Any:
    src = tmp_path / "src.pcap"
    with open(src, "wb") as out:
        write_pcap(out, n, rate_pps=rate)
    return broker("-r", str(src), *args)


def test_dump_rotates_as_tcpdump(broker: Any, tmp_path: Path) -> None:
    """-C with -W: a ring of files FILE0..FILE2, each within the size, the
    oldest overwritten; read in ring order they end with the stream's last
    packets. pcap too."""
    b = _serve_file(broker, tmp_path, 3000)
    want = [p.data for p in read_pcap(str(tmp_path / "src.pcap")).packets]
    out = tmp_path / "ring.pcapng"
    r = run_pktipc("dump", "--server", b.name, "--format", "pcapng", "-w", str(out),
                   "-C", "100k", "-W", "3")
    assert r.returncode == 0, r.stderr
    files = sorted(tmp_path.glob("ring.pcapng*"))
    assert [f.name for f in files] == ["ring.pcapng0", "ring.pcapng1", "ring.pcapng2"]
    newest = max(files, key=lambda f: f.stat().st_mtime_ns)
    order = files[files.index(newest) + 1 :] + files[: files.index(newest) + 1]
    got = [p.data for f in order for p in read_pcap(str(f)).packets]
    assert got == want[-len(got):] and len(got) > 100
    for f in files:
        assert f.stat().st_size <= 100 * 1024
        assert len(tshark(f, "frame.number")) == len(read_pcap(str(f)).packets)
    b2 = _serve_file(broker, tmp_path, 500)
    r = run_pktipc("dump", "--server", b2.name, "-w", str(tmp_path / "p.pcap"), "-C", "20k")
    assert r.returncode == 0, r.stderr
    names = sorted(p.name for p in tmp_path.glob("p.pcap*"))
    assert names[0] == "p.pcap" and names[1] == "p.pcap1" and len(names) > 3
    got = [p.data for n in ["p.pcap"] + [f"p.pcap{i}" for i in range(1, len(names))]
           for p in read_pcap(str(tmp_path / n)).packets]
    assert got == [p.data for p in read_pcap(str(tmp_path / "src.pcap")).packets][:500]


def test_dump_by_time_stops_after_w_files(broker: Any, tmp_path: Path) -> None:
    """-G with -W alone: a new file every SEC seconds, then the end."""
    b = _serve_file(broker, tmp_path, 30, "--realtime", rate=10)    # 3 s of packets
    t = time.monotonic()
    r = run_pktipc("dump", "--server", b.name, "-w", str(tmp_path / "t-%H%M%S.pcap"),
                   "-G", "0.4", "-W", "2")
    assert r.returncode == 0, r.stderr
    assert r.stderr == "pktipc: maximum file limit reached: 2\n"
    assert 0.7 < time.monotonic() - t < 3
    files = sorted(tmp_path.glob("t-*.pcap"))
    assert 1 <= len(files) <= 2
    assert 0 < sum(len(read_pcap(str(f)).packets) for f in files) < 15    # a name per second
    b.proc.terminate()


@pytest.mark.parametrize("args, message", [
    (["-W", "3"], "-W needs -C or -G"),
    (["-C", "1", "-w", "-"], "-C and -G write files: give -w FILE, not -"),
    (["-C", "0"], "-C SIZE must be at least 1 byte"),
    (["-G", "0"], "-G SEC must be a positive number of seconds"),
    (["-C", "x"], "not a size: 'x'"),
])
def test_dump_rotation_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    if "-w" not in args:
        args = [*args, "-w", str(tmp_path / "x")]
    r = run_pktipc("dump", "--server", "nobody", *args)
    assert r.returncode != 0 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
