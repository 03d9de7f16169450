"""The shared-memory layout: numpy and C pinned to the cffi declarations, the
segment over a plain bytearray, and the C ingest filling slabs from real
captures, checked packet by packet against libpcap read independently."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import PCAPS, ROOT, all_captures
from hypothesis import given, settings
from hypothesis import strategies as st
from pcapref import PcapError, read_pcap
from pktipc._shm import ffi, lib

from pktipc._broker.dispatch import SlabPool
from pktipc._broker.files import NO_LIMIT, FileSource
from pktipc._errors import LayoutError, SourceError
from pktipc._layout import (
    BATCH_REC_DTYPE,
    PKT_DTYPE,
    Geometry,
    Iface,
    Segment,
)

SHM = ROOT / "shm"
STRUCTS = ["pktipc_pkt", "pktipc_counters", "pktipc_iface", "pktipc_header",
           "pktipc_batch_rec"]
DECNET = PCAPS / "DECnet_Phone.pcap"         # 139 small Ethernet frames, strictly ordered
HUGE = PCAPS / "huge-tipc-messages.pcap"     # frames of 38 bytes up to 66014 bytes
ALL = 0xFFFFFFFF                             # max_pkts: no limit


def align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


# --- numpy dtypes pinned to cffi -------------------------------------------------


@pytest.mark.parametrize("dtype,ctype", [(PKT_DTYPE, "struct pktipc_pkt"),
                                         (BATCH_REC_DTYPE, "struct pktipc_batch_rec")])
def test_dtype_matches_cffi(dtype: np.dtype[Any], ctype: str) -> None:
    t = ffi.typeof(ctype)
    assert dtype.itemsize == ffi.sizeof(t)
    assert list(dtype.names or ()) == [name for name, _ in t.fields]
    for name, field in t.fields:
        fdt, off = dtype.fields[name][:2]
        assert off == field.offset == ffi.offsetof(ctype, name), name
        assert fdt.itemsize == ffi.sizeof(field.type), name
        assert fdt.kind == ("i" if field.type.cname.startswith("int") else "u"), name
        assert fdt.byteorder in "<|" or (fdt.byteorder == "=" and np.little_endian), name


def test_descriptor_is_abi_v1() -> None:
    # DESIGN.md §3: the descriptor, byte by byte. Changing it needs a new
    # layout version, so this table is written out on purpose. Layout 2 kept
    # it (a frame area and the NO_HASH flag are what it added: LAYOUT.md).
    assert lib.PKTIPC_LAYOUT_VERSION == 2
    assert PKT_DTYPE.itemsize == lib.PKTIPC_DESC_SIZE == 32
    assert {n: (PKT_DTYPE.fields[n][1], PKT_DTYPE.fields[n][0].itemsize)
            for n in PKT_DTYPE.names or ()} == {
        "ts_ns": (0, 8), "data_off": (8, 4), "caplen": (12, 4), "wirelen": (16, 4),
        "hash": (20, 4), "iface": (24, 2), "linktype": (26, 2), "vlan_tci": (28, 2),
        "flags": (30, 2)}
    assert BATCH_REC_DTYPE.itemsize == lib.PKTIPC_BATCH_REC_SIZE == 64
    assert BATCH_REC_DTYPE.fields["seq"][1] == 0


def test_dtype_reads_what_cffi_writes() -> None:
    pkts = ffi.new("struct pktipc_pkt[2]")
    values = dict(ts_ns=-(1 << 62) + 12345, data_off=0xDEADBEEF, caplen=1514, wirelen=9000,
                  hash=0x01020304, iface=7, linktype=113, vlan_tci=0xA123, flags=0x8001)
    for name, v in values.items():
        setattr(pkts[1], name, v)
    arr = np.frombuffer(ffi.buffer(pkts), dtype=PKT_DTYPE)
    assert arr[0].tolist() == (0,) * 9
    assert {n: int(arr[1][n]) for n in values} == values
    # ... and cffi reads what numpy writes.
    arr2 = np.zeros(1, dtype=BATCH_REC_DTYPE)
    arr2["seq"], arr2["first_ts_ns"], arr2["broker_drops"] = (1 << 64) - 1, -5, 3
    rec = ffi.cast("struct pktipc_batch_rec *", ffi.from_buffer(arr2))
    assert (rec.seq, rec.first_ts_ns, rec.broker_drops) == ((1 << 64) - 1, -5, 3)


# --- the C header, compiled -------------------------------------------------------

LAYOUT_DEFINES = re.findall(r"^#define\s+(PKTIPC_\w+)\s+\S", (SHM / "pktipc_layout.h").read_text(),
                            re.M)


def c_program() -> str:
    """Prints every size, offset and constant the cffi module knows, as the C
    compiler sees them; then reads segment files through the inline accessors."""
    lines = ['#include <stdio.h>', '#include <stdlib.h>', '#include "pktipc_shm.h"', "",
             "static unsigned long long fnv(const uint8_t *p, uint32_t n)", "{",
             "    unsigned long long h = 14695981039346656037ull;",
             "    for (uint32_t i = 0; i < n; i++)", "        h = (h ^ p[i]) * 1099511628211ull;",
             "    return h;", "}", "",
             "int main(int argc, char **argv)", "{"]
    for s in STRUCTS:
        lines.append(f'    printf("size {s} %zu\\n", sizeof(struct {s}));')
        for name, _ in ffi.typeof(f"struct {s}").fields:
            lines.append(f'    printf("off {s}.{name} %zu\\n", offsetof(struct {s}, {name}));')
    for name in LAYOUT_DEFINES:
        lines.append(f'    printf("const {name} %llu\\n", (unsigned long long)({name}));')
    lines += """
    for (int a = 1; a < argc; a++) {
        FILE *f = fopen(argv[a], "rb");
        if (!f)
            return 2;
        fseek(f, 0, SEEK_END);
        long size = ftell(f);
        fseek(f, 0, SEEK_SET);
        uint8_t *base = aligned_alloc(4096, (size_t)(size + 4095) / 4096 * 4096);
        if (!base || fread(base, 1, (size_t)size, f) != (size_t)size)
            return 3;
        fclose(f);
        struct pktipc_header hdr;
        int ok = pktipc_shm_attach(base, (uint64_t)size, &hdr);
        printf("file %d check %d %d\\n", a, ok, pktipc_shm_check(base, (uint64_t)size));
        if (ok == 0) {
            const struct pktipc_header *h = &hdr;
            for (uint32_t s = 0; s < h->slab_count; s++) {
                const struct pktipc_batch_rec *r = pktipc_shm_batch(base, h, s);
                if (!r->count)
                    continue;
                printf("batch %u %llu %u %u %u %lld %lld\\n", r->slab,
                       (unsigned long long)r->seq, r->gen, r->count, r->data_bytes,
                       (long long)r->first_ts_ns, (long long)r->last_ts_ns);
                const uint8_t *slab = pktipc_shm_slab(base, h, s);
                const struct pktipc_pkt *p = pktipc_slab_pkts(slab);
                for (uint32_t i = 0; i < r->count; i++)
                    printf("pkt %lld %u %u %u %u %u %016llx\\n", (long long)p[i].ts_ns,
                           p[i].caplen, p[i].wirelen, p[i].linktype, p[i].flags,
                           pktipc_pkt_direction(&p[i]),
                           fnv(pktipc_pkt_bytes(slab, &p[i]), p[i].caplen));
            }
        }
        free(base);
    }
    return 0;
}""".splitlines()
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    assert gcc, "gcc is needed to check the C header"
    d = tmp_path_factory.mktemp("c")
    src, exe = d / "layout.c", d / "layout"
    src.write_text(c_program())
    r = subprocess.run([gcc, "-Wall", "-Wextra", "-Werror", "-std=c11", "-pedantic",
                        "-I", str(SHM), "-o", str(exe), str(src)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"pktipc_shm.h does not compile cleanly:\n{r.stderr}"
    return exe


def run_c(exe: Path, *files: Path) -> list[list[str]]:
    r = subprocess.run([str(exe), *map(str, files)], capture_output=True, text=True,
                       timeout=60, check=True)
    return [line.split() for line in r.stdout.splitlines()]


def test_c_sizes_and_offsets_match_cffi(c_reader: Path) -> None:
    out = run_c(c_reader)
    sizes = {w[1]: int(w[2]) for w in out if w[0] == "size"}
    offsets = {w[1]: int(w[2]) for w in out if w[0] == "off"}
    assert sizes == {s: ffi.sizeof(f"struct {s}") for s in STRUCTS}
    assert offsets == {f"{s}.{name}": ffi.offsetof(f"struct {s}", name)
                       for s in STRUCTS for name, _ in ffi.typeof(f"struct {s}").fields}
    assert sizes["pktipc_header"] == lib.PKTIPC_HEADER_SIZE


def test_c_constants_match_cffi(c_reader: Path) -> None:
    consts = {w[1]: int(w[2]) for w in run_c(c_reader) if w[0] == "const"}
    assert len(consts) > 20
    assert consts == {name: getattr(lib, name) for name in LAYOUT_DEFINES}


def compile_with_layout(tmp_path: Path, layout: str) -> subprocess.CompletedProcess[str]:
    """Compiles a consumer against pktipc_shm.h over an edited layout header."""
    (tmp_path / "pktipc_layout.h").write_text(layout)
    shutil.copy(SHM / "pktipc_shm.h", tmp_path / "pktipc_shm.h")
    (tmp_path / "t.c").write_text('#include "pktipc_shm.h"\nint main(void) { return 0; }\n')
    return subprocess.run(["gcc", "-std=c11", "-fsyntax-only", "-I", str(tmp_path),
                           str(tmp_path / "t.c")], capture_output=True, text=True, timeout=60)


def test_header_asserts_catch_a_moved_field(tmp_path: Path) -> None:
    """The static asserts are live: a header whose layout moved is refused."""
    layout = (SHM / "pktipc_layout.h").read_text()
    assert compile_with_layout(tmp_path, layout).returncode == 0
    moved = layout.replace("uint32_t caplen;", "uint32_t inserted; uint32_t caplen;", 1)
    assert moved != layout
    r = compile_with_layout(tmp_path, moved)
    assert r.returncode != 0
    assert "pktipc_pkt.caplen moved" in r.stderr and "descriptor size" in r.stderr


def test_header_asserts_catch_a_narrowed_field(tmp_path: Path) -> None:
    layout = (SHM / "pktipc_layout.h").read_text()
    narrowed = layout.replace("uint32_t caplen;", "uint16_t caplen;", 1)
    assert narrowed != layout
    assert compile_with_layout(tmp_path, narrowed).returncode != 0


# --- the segment over a bytearray -------------------------------------------------

IFACES = [Iface("DECnet_Phone.pcap", 1, 65535),
          Iface("eth0", 113, 262144, kind=lib.PKTIPC_IFACE_LIVE, ifindex=3,
                ts_resolution=1_000_000)]


def new_segment(slab_size: int = 8192, slab_count: int = 4,
                ifaces: list[Iface] | None = None,
                frames: tuple[int, int] = (0, 0)) -> tuple[bytearray, Segment]:
    ifaces = IFACES if ifaces is None else ifaces
    g = Geometry(slab_size, slab_count, len(ifaces), *frames)
    buf = bytearray(g.total_size)
    seg = Segment(buf, writable=True)
    seg.init(g, name="unit", epoch=0x1234, ifaces=ifaces)
    return buf, seg


def test_segment_init_and_check() -> None:
    buf, seg = new_segment()
    seg.check()
    h = seg.header
    g = seg.geometry
    assert (g.slab_size, g.slab_count) == (8192, 4)
    assert h.magic == lib.PKTIPC_MAGIC and h.layout_version == lib.PKTIPC_LAYOUT_VERSION
    assert bytes(buf[:8]) == b"PKTIPC\0\1"
    assert h.total_size == len(buf) == g.total_size
    assert h.epoch == 0x1234 and ffi.string(h.name) == b"unit"
    assert h.state == lib.PKTIPC_STATE_STARTING
    assert h.slabs_off % lib.PKTIPC_SLAB_ALIGN == 0 and h.batch_table_off % 64 == 0
    assert h.batch_table_off + 4 * lib.PKTIPC_BATCH_REC_SIZE <= h.slabs_off
    assert seg.ifaces() == IFACES
    assert set(seg.counters().values()) == {0}
    # A reader maps it read-only and sees the same.
    ro = Segment(bytes(buf))
    ro.check()
    assert ro.ifaces() == IFACES
    with pytest.raises(BufferError):
        Segment(bytes(buf), writable=True)


def test_segment_slabs_do_not_overlap() -> None:
    buf, seg = new_segment(slab_size=4096, slab_count=3)
    base = int(ffi.cast("uintptr_t", seg.slab_ptr(0)))
    offs = [int(ffi.cast("uintptr_t", seg.slab_ptr(i))) - base for i in range(3)]
    assert offs == [0, 4096, 8192]
    assert int(ffi.cast("uintptr_t", seg.slab_ptr(2))) + 4096 == \
        int(ffi.cast("uintptr_t", ffi.from_buffer(buf))) + len(buf)
    recs = [int(ffi.cast("uintptr_t", seg.batch_rec(i))) for i in range(3)]
    assert [b - a for a, b in zip(recs, recs[1:], strict=False)] == [64, 64]


def test_init_refuses_a_small_buffer_or_wrong_sources() -> None:
    g = Geometry(4096, 2, 1)
    with pytest.raises(ValueError):
        Segment(bytearray(g.total_size - 1), writable=True).init(
            g, name="x", epoch=1, ifaces=IFACES[:1])
    with pytest.raises(ValueError):
        Segment(bytearray(g.total_size), writable=True).init(
            g, name="x", epoch=1, ifaces=IFACES)


@pytest.mark.parametrize("args", [(4095, 2), (4097, 2), (0, 2), (4096, 1), (4096, 65536),
                                  (1 << 31, 2), (4096, 2, 1, 2048, 0), (4096, 2, 1, 0, 8),
                                  (4096, 2, 1, 1024, 8), (4096, 2, 1, 3072, 8),
                                  (4096, 2, 1, 8192, 8), (1 << 20, 64, 1, 4096, 1 << 20)])
def test_geometry_refuses(args: tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        Geometry(*args)


def test_frame_area_follows_the_slabs() -> None:
    g = Geometry(4096, 3, 1, 2048, 5)
    assert g.frames_off == g.slabs_off + 3 * 4096
    assert g.total_size == g.frames_off + 5 * 2048
    assert Geometry(4096, 3, 1).frames_off == Geometry(4096, 3, 1).total_size
    # The farthest frame is within 4 GiB of the first slab: data_off reaches it.
    most = (1 << 32) - 64 * 65536
    big = Geometry(65536, 64, 1, 4096, most // 4096)
    assert big.total_size - big.slabs_off == 1 << 32
    with pytest.raises(ValueError, match="4 GiB"):
        Geometry(65536, 64, 1, 4096, most // 4096 + 1)
    buf, seg = new_segment(frames=(2048, 8))
    ro = Segment(bytes(buf))
    ro.check()
    assert (ro.header.frame_size, ro.header.frame_count) == (2048, 8)
    assert ro.geometry == seg.geometry
    assert int(ffi.cast("uintptr_t", seg.frames_ptr())) - int(
        ffi.cast("uintptr_t", seg.slab_ptr(0))) == 4 * 8192


def test_frames_lie_in_their_slab_or_in_the_frame_area() -> None:
    """pktipc_pkts_check, what both clients run on every batch: a frame past
    the slab is sound only within the frame area."""
    _, seg = new_segment(slab_size=4096, slab_count=2, frames=(2048, 4))
    area = seg.geometry.frames_off - seg.geometry.slab_off(0)   # from slab 0
    d = np.zeros(3, dtype=PKT_DTYPE)
    d["data_off"] = [4000, area, area + 2048 * 3 + 256]
    d["caplen"] = [96, 60, 1792]
    assert seg.pkts_check(0, d) == 3
    d["caplen"][2] = 1793                     # one byte past the area
    assert seg.pkts_check(0, d) == 2
    d["caplen"][2], d["caplen"][0] = 1792, 97  # past the slab, short of the area
    assert seg.pkts_check(0, d) == 0
    d["caplen"][0], d["data_off"][2], d["caplen"][2] = 96, 4096 + 256, 0    # in slab 1
    assert seg.pkts_check(0, d) == 2
    area1 = seg.geometry.frames_off - seg.geometry.slab_off(1)
    one = d[1:2].copy()
    one["data_off"] = area1
    assert seg.pkts_check(1, one) == 1 and seg.pkts_check(0, one) == 0
    _, plain = new_segment(slab_size=4096, slab_count=2)
    d["data_off"], d["caplen"] = 4096 - 60, 60
    assert plain.pkts_check(0, d) == 3
    d["data_off"][1] = 4096
    assert plain.pkts_check(0, d) == 1


def _set(field: str, value: Any) -> Any:
    def mutate(buf: bytearray, seg: Segment) -> bytearray:
        setattr(seg.header, field, value(getattr(seg.header, field)) if callable(value)
                else value)
        return buf
    return mutate


def _past_the_end(buf: bytearray, seg: Segment, field: str) -> bytearray:
    """Points a table at the segment's last bytes; everything else agrees."""
    setattr(seg.header, field, seg.header.total_size - 8)
    return buf


BAD_HEADERS = {
    "zeroed": lambda buf, seg: bytearray(len(buf)),
    "bad magic": _set("magic", lambda m: m ^ 1),
    "version + 1": _set("layout_version", lambda v: v + 1),
    "version 0": _set("layout_version", 0),
    "desc_size": _set("desc_size", 48),
    "batch_rec_size": _set("batch_rec_size", 32),
    "iface_size": _set("iface_size", 64),
    "total_size beyond buffer": _set("total_size", lambda t: t + 4096),
    "total_size short": _set("total_size", lambda t: t - 4096),
    "slabs_off": _set("slabs_off", lambda o: o + 4096),
    "batch_table_off": _set("batch_table_off", lambda o: o + 64),
    "iface_table_off": _set("iface_table_off", lambda o: o + 128),
    "slab_size zero": _set("slab_size", 0),
    "slab_size unaligned": _set("slab_size", lambda s: s + 1),
    "slab_size larger": _set("slab_size", lambda s: s * 2),
    "slab_count one": _set("slab_count", 1),
    "slab_count larger": _set("slab_count", lambda c: c + 1),
    "iface_count huge": _set("iface_count", lambda c: lib.PKTIPC_MAX_IFACES + 1),
    "iface_count larger": _set("iface_count", lambda c: c + 1),
    "frame_size without frames": _set("frame_size", 2048),
    "frame_count without a size": _set("frame_count", 4),
    "frames_off moved": _set("frames_off", lambda o: o + 4096),
    "batch table past the end": lambda buf, seg: _past_the_end(buf, seg, "batch_table_off"),
    "truncated buffer": lambda buf, seg: buf[:-1],
    "header only": lambda buf, seg: buf[:lib.PKTIPC_HEADER_SIZE],
    "shorter than a header": lambda buf, seg: buf[:100],
    "empty": lambda buf, seg: bytearray(),
}

# The C check (pktipc_shm_attach) is the one check: it refuses them all.
C_MUST_REFUSE = set(BAD_HEADERS)


def test_the_python_check_is_the_c_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Segment.check asks pktipc_shm_attach, compiled from shm/pktipc_shm.h
    as every C reader includes it, and obeys it either way."""
    import pktipc._layout as layout

    calls: list[int] = []

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(lib, name)

        def pktipc_shm_attach(self, base: Any, size: int, h: Any) -> int:
            calls.append(size)
            lib.pktipc_shm_attach(base, size, h)
            return -1                           # "no": a sound segment is refused
    buf, _ = new_segment()
    monkeypatch.setattr(layout, "lib", Spy())
    with pytest.raises(LayoutError):
        Segment(bytes(buf)).check()
    assert calls == [len(buf)]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=4))
def test_python_and_c_agree_on_any_header(c_reader: Path, tmp_path_factory: Any,
                                          flips: list[tuple[int, int]]) -> None:
    """Bytes of the header's geometry changed at random: the Python client
    and a C reader (through pktipc_shm.h) accept and refuse alike."""
    buf, _ = new_segment()
    for at, value in flips:
        buf[8 + at % 104] = value               # version to frame_count
    f = tmp_path_factory.mktemp("h") / "seg"
    f.write_bytes(buf)
    try:
        Segment(bytes(buf)).check()
        python = 0
    except LayoutError:
        python = -1
    [line] = [w for w in run_c(c_reader, f) if w[0] == "file"]
    assert line[3:] == [str(python), str(python)]


def test_c_check_bounds_the_batch_table(c_reader: Path, tmp_path: Path) -> None:
    buf, seg = new_segment()
    f = tmp_path / "seg"
    f.write_bytes(BAD_HEADERS["batch table past the end"](buf, seg))
    assert run_c(c_reader, f)[-1] == ["file", "1", "check", "-1", "-1"]


@pytest.mark.parametrize("name", list(BAD_HEADERS))
def test_check_refuses(name: str) -> None:
    buf, seg = new_segment()
    bad = BAD_HEADERS[name](buf, seg)
    with pytest.raises(LayoutError):
        Segment(bytes(bad)).check()


def test_c_check_agrees(c_reader: Path, tmp_path: Path) -> None:
    files = []
    good, _ = new_segment()
    (tmp_path / "good").write_bytes(good)
    files.append(tmp_path / "good")
    for name in sorted(C_MUST_REFUSE):
        buf, seg = new_segment()
        f = tmp_path / name.replace(" ", "_")
        f.write_bytes(BAD_HEADERS[name](buf, seg))
        files.append(f)
    out = run_c(c_reader, *files)
    results = {files[int(w[1]) - 1].name: int(w[3]) for w in out if w[0] == "file"}
    assert results.pop("good") == 0
    assert results == {f.name: -1 for f in files[1:]}


# --- slab pool ---------------------------------------------------------------------


def test_slab_pool() -> None:
    pool = SlabPool(3)
    assert pool.in_use == 0
    assert [pool.take(), pool.take()] == [0, 1]
    assert pool.in_use == 2
    assert pool.publish(0, holders=2) == 1
    assert pool.refs[0] == 2
    assert pool.unref(0) is False
    assert 0 not in pool.free
    assert pool.unref(0) is True
    assert list(pool.free) == [2, 0]
    with pytest.raises(ValueError):
        pool.unref(0)                       # no holder left
    # Published to nobody: free again at once, but it still counts as published.
    assert pool.publish(1, holders=0) == 1
    assert list(pool.free) == [2, 0, 1]
    assert pool.take() == 2
    pool.give_back(2)                       # taken, never published: first out again
    assert pool.take() == 2
    assert pool.gen[2] == 0
    assert pool.take() == 0
    assert pool.publish(0, holders=1) == 2  # second publication of slab 0
    assert pool.take() == 1
    assert pool.take() is None
    assert pool.in_use == 3


# --- filling slabs from real captures ---------------------------------------------


def slab_packets(buf: bytearray, seg: Segment, slab: int, count: int
                 ) -> list[tuple[Any, ...]]:
    """(ts_ns, caplen, wirelen, bytes, linktype, iface, flags, hash, vlan) of each
    packet in a slab, read through Segment.descriptors; checks the packing."""
    g = seg.geometry
    base = g.slab_off(slab)
    d = seg.descriptors(slab, count)
    out = []
    low = g.slab_size
    for p in d:
        off, cap = int(p["data_off"]), int(p["caplen"])
        assert off % lib.PKTIPC_FRAME_ALIGN == 0
        assert off + cap <= low, "frames grow down from the slab's end, without overlap"
        low = off
        data = bytes(buf[base + off:base + off + cap])
        out.append((int(p["ts_ns"]), cap, int(p["wirelen"]), data, int(p["linktype"]),
                    int(p["iface"]), int(p["flags"]), int(p["hash"]), int(p["vlan_tci"])))
    assert count * lib.PKTIPC_DESC_SIZE <= low, "descriptors and frames never meet"
    return out


def fill_file(path: Path, slab_size: int, iface: int = 0
              ) -> tuple[list[tuple[Any, ...]], int, str | None, int]:
    """Every packet of `path` through pkb_src_fill, a slab at a time over two
    alternating slabs; returns (packets, last status, error, slabs filled)."""
    src = FileSource([str(path)])
    buf, seg = new_segment(slab_size, 2, src.ifaces)
    fill = ffi.new("struct pkb_fill *")
    packets: list[tuple[Any, ...]] = []
    slab, slabs = 0, 0
    while True:
        lib.pkb_fill_begin(fill, seg.slab_ptr(slab), slab_size, iface)
        status = lib.pkb_src_fill(src.current, fill, NO_LIMIT, ALL)
        slabs += 1
        packets += slab_packets(buf, seg, slab, fill.count)
        if status != lib.PKB_FILL_FULL:
            break
        assert fill.count > 0
        slab ^= 1
    error = ffi.string(lib.pkb_src_error(src.current)).decode() or None
    return packets, status, error, slabs


def expected(path: Path, iface: int = 0) -> tuple[list[tuple[Any, ...]], str | None]:
    ref = read_pcap(str(path))
    return [(p.ts_ns, p.caplen, p.wirelen, p.data, ref.linktype, iface,
             lib.PKTIPC_F_TRUNCATED if p.caplen < p.wirelen else 0,
             lib.pkb_flow_hash(p.data, p.caplen, ref.linktype, 0), 0)
            for p in ref.packets], ref.error


@pytest.mark.parametrize("path", all_captures(), ids=lambda p: p.name)
def test_fill_matches_libpcap(path: Path) -> None:
    want, ref_error = expected(path)
    assert ref_error is None
    biggest = max(p[1] for p in want)
    # Small slabs, so most files take several: the packet that does not fit
    # must open the next slab.
    slab_size = max(4096, align(biggest + lib.PKTIPC_DESC_SIZE + 8, 4096))
    got, status, error, slabs = fill_file(path, slab_size, iface=0)
    assert (status, error) == (lib.PKB_FILL_EOF, None)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g == w, f"packet {i} of {path.name}"
    room = sum(align(p[1], 8) + lib.PKTIPC_DESC_SIZE for p in want)
    assert slabs >= -(-room // slab_size)


def test_fill_stamps_the_iface_index() -> None:
    got, status, _, _ = fill_file(DECNET, 65536, iface=5)
    assert status == lib.PKB_FILL_EOF
    assert {p[5] for p in got} == {5}


def test_full_slab_leaves_the_packet_pending() -> None:
    want, _ = expected(DECNET)
    src = FileSource([str(DECNET)])
    buf, seg = new_segment(4096, 2, src.ifaces)
    fill = ffi.new("struct pkb_fill *")
    lib.pkb_fill_begin(fill, seg.slab_ptr(0), 4096, 0)
    assert lib.pkb_src_fill(src.current, fill, NO_LIMIT, ALL) == lib.PKB_FILL_FULL
    k = fill.count
    # As many as fit, and not one more.
    used = sum(align(p[1], 8) + 32 for p in want[:k])
    assert used <= 4096 < used + align(want[k][1], 8) + 32
    assert fill.data_low == 4096 - sum(align(p[1], 8) for p in want[:k])
    assert fill.bytes == sum(p[1] for p in want[:k])
    assert (fill.first_ts_ns, fill.last_ts_ns) == (want[0][0], want[k - 1][0])
    assert lib.pkb_src_pending_caplen(src.current) == want[k][1]
    assert lib.pkb_src_peek_ts(src.current) == want[k][0]
    # Filling the same full slab again adds nothing.
    assert lib.pkb_src_fill(src.current, fill, NO_LIMIT, ALL) == lib.PKB_FILL_FULL
    assert fill.count == k
    # The next slab starts with the pending packet.
    lib.pkb_fill_begin(fill, seg.slab_ptr(1), 4096, 0)
    assert lib.pkb_src_fill(src.current, fill, NO_LIMIT, ALL) == lib.PKB_FILL_FULL
    assert slab_packets(buf, seg, 1, fill.count) == want[k:k + fill.count]
    assert slab_packets(buf, seg, 0, k) == want[:k]     # untouched


def test_max_pkts_stops_a_fill() -> None:
    want, _ = expected(DECNET)
    src = FileSource([str(DECNET)])
    buf, seg = new_segment(65536, 2, src.ifaces)
    fill = ffi.new("struct pkb_fill *")
    lib.pkb_fill_begin(fill, seg.slab_ptr(0), 65536, 0)
    assert lib.pkb_src_fill(src.current, fill, NO_LIMIT, 3) == lib.PKB_FILL_FULL
    assert fill.count == 3
    assert lib.pkb_src_fill(src.current, fill, NO_LIMIT, 5) == lib.PKB_FILL_FULL
    assert slab_packets(buf, seg, 0, 5) == want[:5]


def test_packet_too_big_for_any_slab() -> None:
    want, _ = expected(HUGE)
    big = next(i for i, p in enumerate(want) if p[1] > 4096 - 32)
    src = FileSource([str(HUGE)])
    buf, seg = new_segment(4096, 2, src.ifaces)
    fill = ffi.new("struct pkb_fill *")
    lib.pkb_fill_begin(fill, seg.slab_ptr(0), 4096, 0)
    res = src.read_into(fill)
    # The small packets before it fill one slab; then it fits nowhere.
    assert (res.status, res.packets) == (lib.PKB_FILL_FULL, big)
    lib.pkb_fill_begin(fill, seg.slab_ptr(1), 4096, 0)
    res = src.read_into(fill)
    assert (res.status, res.packets, fill.count) == (lib.PKB_FILL_TOOBIG, 0, 0)
    assert res.error is not None
    assert str(want[big][1]) in res.error and "4096" in res.error
    assert src.pending_caplen() == want[big][1]
    # Nothing is lost: a slab big enough takes it next.
    g = Geometry(align(want[big][1] + 40, 4096), 2, 1)
    buf2 = bytearray(g.total_size)
    seg2 = Segment(buf2, writable=True)
    seg2.init(g, name="big", epoch=1, ifaces=src.ifaces)
    lib.pkb_fill_begin(fill, seg2.slab_ptr(0), g.slab_size, 0)
    assert lib.pkb_src_fill(src.current, fill, NO_LIMIT, 1) == lib.PKB_FILL_FULL
    assert slab_packets(buf2, seg2, 0, 1) == [want[big]]


def test_ts_limit() -> None:
    want, _ = expected(DECNET)
    src = FileSource([str(DECNET)])
    buf, seg = new_segment(65536, 2, src.ifaces)
    fill = ffi.new("struct pkb_fill *")
    lib.pkb_fill_begin(fill, seg.slab_ptr(0), 65536, 0)
    res = src.read_into(fill, want[5][0] - 1)
    assert (res.status, res.packets) == (lib.PKB_FILL_LIMIT, 5)
    assert src.next_ts() == want[5][0]
    assert lib.pkb_src_pending_caplen(src.current) == want[5][1]
    # A packet exactly at the limit is due.
    res = src.read_into(fill, want[5][0])
    assert (res.status, res.packets) == (lib.PKB_FILL_LIMIT, 1)
    # A limit in the past places nothing.
    res = src.read_into(fill, 0)
    assert (res.status, res.packets) == (lib.PKB_FILL_LIMIT, 0)
    res = src.read_into(fill, NO_LIMIT)
    assert res.status == lib.PKB_FILL_EOF
    assert slab_packets(buf, seg, 0, fill.count) == want


def test_end_of_file_is_sticky() -> None:
    src = FileSource([str(DECNET)])
    buf, seg = new_segment(65536, 2, src.ifaces)
    fill = ffi.new("struct pkb_fill *")
    lib.pkb_fill_begin(fill, seg.slab_ptr(0), 65536, 0)
    assert src.read_into(fill).status == lib.PKB_FILL_EOF
    n = fill.count
    res = src.read_into(fill)
    assert (res.status, res.packets, fill.count) == (lib.PKB_FILL_EOF, 0, n)
    assert src.next_ts() == NO_LIMIT
    assert src.pending_caplen() == 0


def test_error_mid_file(tmp_path: Path) -> None:
    data = DECNET.read_bytes()
    # Cut inside the 11th packet's bytes: 24-byte file header, then records.
    off = 24
    for _ in range(10):
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:off + 16 + 5])
    want, ref_error = expected(cut)
    assert ref_error and len(want) == 10
    got, status, error, _ = fill_file(cut, 4096)
    assert status == lib.PKB_FILL_ERROR
    assert error == ref_error
    assert got == want
    # FileSource names the file in the error it reports.
    src = FileSource([str(cut)])
    buf, seg = new_segment(65536, 2, src.ifaces)
    fill = ffi.new("struct pkb_fill *")
    lib.pkb_fill_begin(fill, seg.slab_ptr(0), 65536, 0)
    res = src.read_into(fill)
    assert (res.status, res.packets) == (lib.PKB_FILL_ERROR, 10)
    assert res.error == f"{cut}: {ref_error}"


def test_unreadable_file_is_refused_like_libpcap(tmp_path: Path) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("not a capture\n" * 10)
    with pytest.raises(PcapError) as ref:
        read_pcap(str(f))
    with pytest.raises(SourceError) as e:
        FileSource([str(f)])
    assert str(e.value) == f"{f}: {ref.value}"


def write_pcap(path: Path, linktype: int, packets: list[tuple[int, int, bytes, int]],
               nano: bool = True, order: str = "<") -> None:
    """A classic pcap file; packets are (seconds, fraction, bytes, wirelen)."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = [struct.pack(order + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype)]
    for sec, frac, data, wire in packets:
        out.append(struct.pack(order + "IIII", sec, frac, len(data), wire) + data)
    path.write_bytes(b"".join(out))


@pytest.mark.parametrize("linktype", [1, 100, 101, 102, 103, 106, 228])
def test_linktype_is_the_files_linktype(tmp_path: Path, linktype: int) -> None:
    # libpcap reports DLT_* values; a few historical ones differ from the
    # LINKTYPE_* the file (and the descriptor) carries.
    f = tmp_path / "t.pcap"
    write_pcap(f, linktype, [(1, 2, b"\x45" + bytes(19), 20)])
    assert read_pcap(str(f)).linktype == linktype
    src = FileSource([str(f)])
    assert src.ifaces[0].linktype == linktype
    got, _, _, _ = fill_file(f, 4096)
    assert [p[4] for p in got] == [linktype]


def test_timestamps_and_truncation(tmp_path: Path) -> None:
    ns, us = tmp_path / "ns.pcap", tmp_path / "us.pcap"
    pkts = [(1_700_000_000, 123_456_789, b"a" * 60, 60),
            (1_700_000_001, 0, b"b" * 64, 1514),           # truncated
            (0, 1, b"c", 1),                                # the epoch itself
            ((1 << 31) - 1, 999_999_999, b"d" * 8, 8),      # the last second of int32
            ((1 << 32) - 1, 999_999_999, b"e" * 8, 8),      # the last one of uint32: 2106
            (1_700_000_000, (1 << 32) - 1, b"f" * 8, 8)]    # an unsigned sub-second field
    write_pcap(ns, 1, pkts, nano=True)
    write_pcap(us, 1, [(s, f // 1000, d, w) for s, f, d, w in pkts], nano=False)
    got_ns, _, _, _ = fill_file(ns, 4096)
    got_us, _, _, _ = fill_file(us, 4096)
    # libpcap 1.10 reads both fields signed; the format says unsigned.
    assert [p[0] for p in got_ns] == [1_700_000_000_123_456_789, 1_700_000_001_000_000_000,
                                      1, ((1 << 31) - 1) * 10**9 + 999_999_999,
                                      ((1 << 32) - 1) * 10**9 + 999_999_999,
                                      1_700_000_000 * 10**9 + (1 << 32) - 1]
    assert [p[0] for p in got_us] == [1_700_000_000_123_456_000, 1_700_000_001_000_000_000,
                                      0, ((1 << 31) - 1) * 10**9 + 999_999_000,
                                      ((1 << 32) - 1) * 10**9 + 999_999_000,
                                      1_700_000_000 * 10**9 + ((1 << 32) - 1) // 1000 * 1000]
    assert [(p[1], p[2], p[6]) for p in got_ns] == [
        (60, 60, 0), (64, 1514, lib.PKTIPC_F_TRUNCATED), (1, 1, 0), (8, 8, 0), (8, 8, 0),
        (8, 8, 0)]
    assert got_ns == expected(ns)[0] and got_us == expected(us)[0]
    assert FileSource([str(ns)]).ifaces[0].ts_resolution == 10**9
    assert FileSource([str(us)]).ifaces[0].ts_resolution == 10**6


@pytest.mark.parametrize("order", ["<", ">"], ids=["mapped", "libpcap"])
@pytest.mark.parametrize("nano", [True, False], ids=["ns", "us"])
def test_time_fields_are_unsigned_32_bit_counts(tmp_path: Path, order: str, nano: bool) -> None:
    """Both reading paths (a file in the host's byte order is read from a
    mapping, the other one by libpcap) take a record's seconds and
    sub-second ticks as the format defines them: unsigned 32-bit counts."""
    fields = [(s, f) for s in (0, 1 << 31, (1 << 32) - 1) for f in (0, 1 << 31, (1 << 32) - 1)]
    f = tmp_path / "t.pcap"
    write_pcap(f, 1, [(s, fr, bytes(14), 14) for s, fr in fields], nano=nano, order=order)
    got, status, error, _ = fill_file(f, 4096)
    assert (status, error) == (lib.PKB_FILL_EOF, None)
    tick = 1 if nano else 1000
    assert [p[0] for p in got] == [s * 10**9 + fr * tick for s, fr in fields]
    assert got == expected(f)[0]


def test_pcapng_time_past_2262_ends_the_stream(tmp_path: Path) -> None:
    """A pcapng time that nanoseconds since 1970 in 64 bits cannot hold
    ends the stream with a clear error at that packet, after the others."""
    shb = struct.pack("<IIIHHqI", 0x0A0D0D0A, 28, 0x1A2B3C4D, 1, 0, -1, 28)
    idb = struct.pack("<IIHHII", 1, 20, 1, 0, 0, 20)         # microseconds by default

    def epb(us: int) -> bytes:
        return struct.pack("<IIIIIII", 6, 32 + 16, 0, us >> 32, us & 0xFFFFFFFF, 14, 14) \
            + bytes(16) + struct.pack("<I", 48)
    f = tmp_path / "late.pcapng"
    last_ok = ((1 << 63) - 1) // 1000                           # 2262-04-11, in microseconds
    f.write_bytes(shb + idb + epb(1_700_000_000_000_000) + epb(last_ok) + epb(last_ok + 1))
    got, status, error, _ = fill_file(f, 4096)
    assert [p[0] for p in got] == [1_700_000_000 * 10**9, last_ok * 1000]
    assert status == lib.PKB_FILL_ERROR
    assert error == ("packet 3: its time, 9223372036 s after 1970, is past the year 2262, "
                     "beyond nanosecond timestamps")


def test_empty_capture(tmp_path: Path) -> None:
    f = tmp_path / "empty.pcap"
    write_pcap(f, 1, [])
    got, status, error, slabs = fill_file(f, 4096)
    assert (got, status, error, slabs) == ([], lib.PKB_FILL_EOF, None, 1)


# --- publishing --------------------------------------------------------------------


def test_batch_publish_writes_the_record(c_reader: Path, tmp_path: Path) -> None:
    want, _ = expected(DECNET)
    src = FileSource([str(DECNET)])
    buf, seg = new_segment(4096, 4, src.ifaces)
    fill = ffi.new("struct pkb_fill *")
    lib.pkb_fill_begin(fill, seg.slab_ptr(2), 4096, 0)
    assert lib.pkb_src_fill(src.current, fill, NO_LIMIT, ALL) == lib.PKB_FILL_FULL
    n = fill.count
    lib.pkb_batch_publish(seg.batch_rec(2), 2, 7, 1000, fill, 11, 22)
    table = np.frombuffer(buf, dtype=BATCH_REC_DTYPE, count=4,
                          offset=int(seg.header.batch_table_off))
    rec = table[2]
    assert {k: int(rec[k]) for k in rec.dtype.names or ()} == {
        "seq": 1000, "slab": 2, "gen": 7, "count": n,
        "data_bytes": sum(align(p[1], 8) for p in want[:n]),
        "first_ts_ns": want[0][0], "last_ts_ns": want[n - 1][0],
        "kernel_drops": 11, "broker_drops": 22, "flags": 0, "reserved": 0}
    assert rec["data_bytes"] == 4096 - fill.data_low
    # Only that record was written.
    assert table[[0, 1, 3]].tobytes() == bytes(3 * 64)
    assert seg.batch_rec(2).seq == 1000
    # A C consumer reads the same batch and the same packets through pktipc_shm.h.
    f = tmp_path / "segment"
    f.write_bytes(buf)
    out = run_c(c_reader, f)
    assert ["file", "1", "check", "0", "0"] in out
    [batch] = [w for w in out if w[0] == "batch"]
    assert list(map(int, batch[1:])) == [2, 1000, 7, n, int(rec["data_bytes"]), want[0][0],
                                         want[n - 1][0]]
    pkts = [w for w in out if w[0] == "pkt"]
    assert [(int(w[1]), int(w[2]), int(w[3]), int(w[4]), int(w[5]), int(w[6]), w[7])
            for w in pkts] == [(p[0], p[1], p[2], p[4], p[6], 0, f"{fnv1a(p[3]):016x}")
                               for p in want[:n]]


def fnv1a(data: bytes) -> int:
    h = 14695981039346656037
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h


# --- readers of layout 1 ------------------------------------------------------------


def layout_1_header(tmp_path: Path) -> Path:
    """shm/ as a reader built for layout 1 has it: the version it reads is 1
    (what it does with anything else is all that is tested here)."""
    d = tmp_path / "shm-v1"
    d.mkdir()
    text = (SHM / "pktipc_layout.h").read_text()
    old = f"#define PKTIPC_LAYOUT_VERSION   {lib.PKTIPC_LAYOUT_VERSION}"
    assert old in text
    (d / "pktipc_layout.h").write_text(text.replace(old, "#define PKTIPC_LAYOUT_VERSION   1"))
    for h in SHM.glob("*.h"):
        if h.name != "pktipc_layout.h":
            shutil.copy(h, d / h.name)
    return d


def test_a_layout_1_reader_refuses_a_layout_2_segment(tmp_path: Path) -> None:
    v1 = layout_1_header(tmp_path)
    src, exe = tmp_path / "reader.c", tmp_path / "reader"
    src.write_text(c_program())
    subprocess.run(["gcc", "-std=c11", "-I", str(v1), "-o", str(exe), str(src)], check=True,
                   timeout=60)
    buf, seg = new_segment(frames=(2048, 4))
    (tmp_path / "v2").write_bytes(buf)
    seg.header.layout_version = 1
    (tmp_path / "as-v1").write_bytes(buf)
    out = run_c(exe, tmp_path / "v2", tmp_path / "as-v1")
    assert [w for w in out if w[0] == "file"] == [["file", "1", "check", "-1", "-1"],
                                                   ["file", "2", "check", "0", "0"]]


def test_layout_1_clients_refuse_a_layout_2_broker(broker: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The Python client and libpktipc, each as built for layout 1, say so
    in one line and read nothing."""
    import pktipc
    import pktipc._client.session as session

    b = broker("-r", str(DECNET), "--wait-clients", "3")
    v1 = layout_1_header(tmp_path)
    cdir = ROOT / "clients" / "c"
    exe = tmp_path / "pktipc-count"
    cflags = subprocess.run(["pkg-config", "--cflags", "--libs", "libzmq", "msgpack"],
                            capture_output=True, text=True, check=True).stdout.split()
    subprocess.run(["gcc", "-std=gnu11", "-pthread", "-I", str(v1), "-I", str(cdir / "include"),
                    "-I", str(cdir / "src"), '-DPKTIPC_VERSION="layout-1"', "-o", str(exe),
                    *map(str, sorted((cdir / "src").glob("*.c"))), str(SHM / "pktipc_filter.c"),
                    str(cdir / "examples" / "pktipc-count.c"), *cflags, "-lpcap"],
                   check=True, timeout=120)
    r = subprocess.run([str(exe), "-n", "old", b.name], capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1
    assert r.stderr == (f"pktipc-count: broker '{b.name}' uses layout 2, this library "
                        "reads 1\n")
    with monkeypatch.context() as m, pytest.raises(
            LayoutError, match="^broker uses layout 2, this client reads 1$"):
        m.setattr(session, "LAYOUT_VERSION", 1)
        pktipc.connect(b.name, "old", timeout=5)
    with pktipc.connect(b.name, "new", timeout=5) as c:
        assert c.welcome.layout == 2
