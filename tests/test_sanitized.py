"""The broker's C engines, the layout's selection helpers, the client's
capture-file writer and libpktipc's protocol decoder, built with
AddressSanitizer and UndefinedBehaviorSanitizer (tests/c/): the flow hash
over every capture; the writer over random batches; the file ingest over every
capture and crafted files, each read as libpcap reads it; live capture
through a TPACKET_V3 ring on a veth pair in a namespace of the test's own;
every input a fuzzer once crashed on; and a few seconds of each fuzz target,
the protocol decoder's finds judged by the Python decoder too."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import time
from pathlib import Path

import pytest
from cfuzz import TARGETS, input_id, reports, verdicts_differ, write_seeds
from conftest import ROOT, Netns, all_captures
from pcapref import read_pcap
from pktipc._shm import lib
from test_live import BCAST, MCAST, OTHER, frame, udp4

CDIR = ROOT / "tests" / "c"
BUILD = CDIR / "build"
REGRESSIONS = CDIR / "regressions"
FUZZ_SECONDS = 3
SAN_ENV = {**os.environ, "ASAN_OPTIONS": "detect_leaks=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    r = subprocess.run(["make", "-s", "-C", str(CDIR)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def run(*cmd: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=SAN_ENV,
                          timeout=timeout)


# --- the flow hash and the selection helpers ---------------------------------------


def test_hash_reads_nothing_past_caplen() -> None:
    """Every prefix of every packet of every capture, mutated copies and
    random frames, each in a heap block of its exact size, on every link
    type; then the selection helpers over a batch (tests/c/check-flowhash.c)."""
    r = run(BUILD / "check-flowhash", *all_captures())
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == ""
    calls, total, _ = map(int, r.stdout.split())
    assert calls > 500_000 and total > 0


def test_capture_file_writer_stays_in_its_buffers() -> None:
    """The client's pcap (nanosecond and microsecond) and pcapng records,
    with and without a snap length, and its filter over random batches, slab
    and output each in a heap block of its exact size; a descriptor past the
    slab, a time before 1970, a pcap time past 2106, an unknown format and a
    short output refused (tests/c/check-capwrite.c)."""
    r = run(BUILD / "check-capwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == ""
    written, refused, accepted = map(int, r.stdout.split())
    assert written > 750_000 and refused == 7 * 20_000 and accepted > 0


# --- the file ingest: the mapped reader and libpcap behind it -----------------------


def ingest_reports(files: list[Path]) -> list[dict[str, int | str]]:
    """fuzz-pcap's report of each file: it read the file as libpcap reads
    it, or it failed; whether it was mapped, its packets, how it ended."""
    got = reports(BUILD / "fuzz-pcap", files)
    out = []
    for f in files:
        words = got[input_id(f.read_bytes())].split()
        out.append({k: (v if k == "end" else int(v)) for k, v in zip(words[::2], words[1::2],
                                                                      strict=True)})
    return out


def test_every_capture_read_as_libpcap_reads_it() -> None:
    """Through pkb_src_fill into slabs of several sizes: the same packets,
    bytes, lengths and times as libpcap alone, the same end; every classic
    pcap file in the host's byte order read from its mapping."""
    files = all_captures()
    for f, rep in zip(files, ingest_reports(files), strict=True):
        ref = read_pcap(str(f))
        assert rep["packets"] == len(ref.packets), f.name
        assert rep["end"] == ("error" if ref.error else "eof"), f.name
        assert rep["mapped"] == (f.read_bytes()[:4] == b"\xd4\xc3\xb2\xa1"), f.name


Rec = tuple[int, int, int, int, bytes]      # seconds, sub-second ticks, caplen, len, data


def classic(recs: list[Rec], *, order: str = "<", magic: int = 0xA1B2C3D4, minor: int = 4,
            snaplen: int = 65535, linktype: int = 1) -> bytes:
    head = struct.pack(order + "IHHiIII", magic, 2, minor, 0, 0, snaplen, linktype)
    return head + b"".join(struct.pack(order + "IIII", s, t, c, n) + d for s, t, c, n, d in recs)


def crafted() -> dict[str, bytes]:
    """Classic pcap files out of the ordinary, and every prefix of a plain one."""
    pkts = [bytes((i + j) & 0xFF for j in range(n)) for i, n in enumerate((60, 14, 0, 1514, 99))]
    recs = [(1000 + i, 500 * i, len(p), len(p), p) for i, p in enumerate(pkts)]
    plain = classic(recs)
    files = {f"prefix-{n}": plain[:n] for n in range(len(plain) + 1)}
    files |= {
        "plain": plain,
        "big-endian": classic(recs, order=">"),
        "nanoseconds": classic(recs, magic=0xA1B23C4D),
        "minor-3": classic(recs, minor=3),
        "usb-linux": classic(recs, linktype=189),
        "snaplen-0": classic(recs, snaplen=0),
        "snaplen-64": classic(recs, snaplen=64),          # longer records: libpcap's
        "caplen-over-len": classic([(1, 0, 60, 20, bytes(60))] * 3),
        "caplen-huge": classic([recs[0], (2, 0, 0xFFFFFFFF, 0xFFFFFFFF, b"")]),
        "caplen-past-the-end": classic([recs[0], (2, 0, 500, 500, bytes(100))]),
        "times-at-their-limits": classic([(0xFFFFFFFF, 0xFFFFFFFF, 4, 4, b"abcd"),
                                          (0x80000000, 999999, 0, 0, b""), (0, 0, 1, 1, b"x")]),
        "nanoseconds-max": classic([(0xFFFFFFFF, 0xFFFFFFFF, 4, 4, b"abcd")], magic=0xA1B23C4D),
        "linktype-reserved-bits": classic(recs, linktype=0x00010001),
        "linktype-fcs-bits": classic(recs, linktype=0x14000001),
        "trailing-bytes": plain + b"\x00" * 7,
    }
    return files


def test_a_file_truncated_in_place_while_mapped(tmp_path: Path) -> None:
    """tests/c/check-shrink.c: a capture cut short while the mapped reader
    reads it, at a page boundary inside a record, inside a page, at a record
    boundary, and inside the last page; the read that meets a page past the
    new end (SIGBUS) or the zeros past it ends where it stood, and what is
    served is what libpcap reads of the file as it is now."""
    r = run(BUILD / "check-shrink", tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.splitlines() == [
        'page: ok (1499 packets, "truncated dump file; tried to read 1000 captured bytes, '
        'only got 688")',
        'zeros: ok (1499 packets, "truncated dump file; tried to read 1000 captured bytes, '
        'only got 788")',
        'record: ok (1500 packets, "")',
        'tail: ok (2999 packets, "truncated dump file; tried to read 1000 captured bytes, '
        'only got 990")']


def test_filter_matches_what_libpcap_matches(tmp_path: Path) -> None:
    """tests/c/check-filter.c: the clients' filter (shm/pktipc_filter.c) over
    every packet of the shared captures and of synthetic TCP/UDP flows, some
    VLAN-tagged, laid in slabs as the broker lays them: for a dozen
    expressions, over whole batches and over a member's share written in
    place, exactly the packets pcap_offline_filter passes; libpcap's message
    for a refused expression, naming the link type that refuses it among
    several; nothing of a source the filter was not compiled for."""
    from pktipc._tools.synth import write_pcap

    synth = tmp_path / "synth.pcap"
    with open(synth, "wb") as out:
        write_pcap(out, 4000, flows=200, skew=None)
    files = [*all_captures(), synth]
    r = run(BUILD / "check-filter", *files)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr == ""
    nfiles, packets, matches = map(int, r.stdout.split())
    assert nfiles == len(files) and packets > 4500 and matches > 4000


def test_crafted_files_read_as_libpcap_reads_them(tmp_path: Path) -> None:
    """Truncated anywhere, records longer than the snap length or than the
    file, lengths and times at their limits, the formats' variants: each
    read as libpcap reads it, or refused as libpcap refuses it."""
    paths = []
    for name, data in crafted().items():
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    got = dict(zip((p.name for p in paths), ingest_reports(paths), strict=True))
    for name in ("plain", "nanoseconds", "snaplen-64", "times-at-their-limits", "trailing-bytes"):
        assert got[name]["mapped"] == 1, name
    for name in ("big-endian", "minor-3", "usb-linux"):
        assert got[name]["mapped"] == 0, name
    assert got["plain"] == {"mapped": 1, "packets": 5, "end": "eof"}
    assert got["caplen-past-the-end"] == {"mapped": 1, "packets": 1, "end": "error"}
    assert got["prefix-100"] == {"mapped": 1, "packets": 1, "end": "eof"}     # one whole record
    assert got["prefix-101"] == {"mapped": 1, "packets": 1, "end": "error"}
    assert got["linktype-reserved-bits"] == {"mapped": 0, "packets": 0, "end": "refused"}
    assert got["prefix-23"]["end"] == "refused"


# --- saved inputs and a short run of each fuzzer --------------------------------------


@pytest.mark.parametrize("target", [t for t in TARGETS if (REGRESSIONS / t).is_dir()])
def test_saved_crash_inputs(target: str) -> None:
    """What once crashed a target, or broke what it checks, passes it now."""
    r = run(BUILD / f"fuzz-{target}", *sorted((REGRESSIONS / target).iterdir()))
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("seeds")
    counts = write_seeds(d)
    assert all(counts[t] >= 10 for t in TARGETS), counts
    return d


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_briefly(target: str, seeds: Path, tmp_path: Path) -> None:
    """A few seconds of coverage-guided fuzzing from the shared captures:
    no crash, no leak, nothing a target checks broken."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    dirs = [corpus, seeds / target]
    if (REGRESSIONS / target).is_dir():
        dirs.append(REGRESSIONS / target)
    r = run(BUILD / f"fuzz-{target}", f"-max_total_time={FUZZ_SECONDS}", "-timeout=10",
            f"-artifact_prefix={tmp_path}/", *dirs, timeout=120)
    assert r.returncode == 0, r.stderr[-5000:]
    assert re.search(r"^#\d+\s+DONE\s+cov: \d+", r.stderr, re.M), r.stderr[-2000:]
    if target == "proto":
        # What the decoder's fuzzer reached, and every saved frame: the C
        # decoder and the Python one give each the same verdict.
        frames = [f for d in dirs for f in sorted(d.iterdir())]
        assert verdicts_differ(BUILD / "fuzz-proto", frames) == []


# --- live capture ---------------------------------------------------------------------


def expected(f: bytes, snaplen: int, reinsert: bool, host: bytes
             ) -> tuple[bytes, int, int, int, int]:
    """(bytes, caplen, wirelen, flags, vlan_tci) of a frame sent to the
    captured interface, as afpacket.c should deliver it: the kernel strips
    an outer 802.1Q or 802.1ad tag; the engine puts it back unless told not
    to, or unless the snap length leaves no room for it after both MACs."""
    flags, tci = 0, 0
    tpid = int.from_bytes(f[12:14], "big")
    if tpid in (0x8100, 0x88A8):
        tci = int.from_bytes(f[14:16], "big")
        flags |= lib.PKTIPC_F_VLAN_VALID | (lib.PKTIPC_F_QINQ if tpid == 0x88A8 else 0)
        inner = f[:12] + f[16:]
        snap = min(len(inner), snaplen)
        if reinsert and snap >= 12:
            flags |= lib.PKTIPC_F_VLAN_REINSERTED
            data, wire = f[: min(snap + 4, snaplen)], len(f)
        else:
            data, wire = inner[:snap], len(inner)
    else:
        data, wire = f[:snaplen], len(f)
    if len(data) < wire:
        flags |= lib.PKTIPC_F_TRUNCATED
    dst = f[:6]
    direction = (lib.PKTIPC_DIR_HOST if dst == host else lib.PKTIPC_DIR_BROADCAST
                 if dst == BCAST else lib.PKTIPC_DIR_MULTICAST if dst[0] & 1
                 else lib.PKTIPC_DIR_OTHERHOST)
    return data, len(data), wire, flags | direction << lib.PKTIPC_F_DIR_SHIFT, tci


def live_frames(host: bytes) -> list[bytes]:
    """Untagged, 802.1Q, 802.1ad + 802.1Q, 0x9100 (not stripped), tags at
    the very end of a frame, tiny frames, large ones; to the host, to
    everyone, to a group, to another host."""
    out = []
    for i in range(30):
        dst = (host, BCAST, MCAST, OTHER)[i % 4]
        n = (0, 1, 18, 200, 1400)[i % 5]
        out += [
            frame(dst, udp4(1000 + i, 53, n)),
            frame(dst, udp4(2000 + i, 80, n), (0x8100, 0x2000 | i)),
            frame(dst, udp4(3000 + i, 443, n), (0x88A8, 0xE000 | 4094), (0x8100, i)),
            frame(dst, udp4(4000 + i, 8, n), (0x9100, 7)),
        ]
    out += [
        host + OTHER + b"\x88\xb5",                       # an Ethernet header and nothing more
        # The shortest tagged frames the kernel takes (it drops a tag with
        # fewer than two bytes behind its inner type before any capture):
        OTHER + host + b"\x81\x00\x00\x05\x08\x00\x45\x00",
        BCAST + OTHER + b"\x88\xa8\x00\x01\x81\x00\x00\x02\x86\xdd\x60\x00",
        OTHER + host + b"\x08\x00" + b"\x45",             # one byte of IPv4
    ]
    return out


@pytest.mark.parametrize("snaplen, reinsert, slab, max_pkts, block", [
    (262144, 1, 1 << 20, 0xFFFFFFFF, 1 << 16),     # whole frames, tags put back
    (262144, 0, 1 << 20, 0xFFFFFFFF, 1 << 16),     # tags left in the descriptors
    (64, 1, 1 << 16, 0xFFFFFFFF, 1 << 16),         # cut by the snap length
    (14, 1, 1 << 16, 0xFFFFFFFF, 1 << 16),         # room for half a tag
    (8, 1, 1 << 16, 0xFFFFFFFF, 1 << 16),          # not even both MACs
    (262144, 1, 4096, 3, 4096),                    # small slabs: blocks read in pieces
])
def test_ring_under_sanitizers(netns: Netns, tmp_path: Path, snaplen: int, reinsert: int,
                               slab: int, max_pkts: int, block: int) -> None:
    """tests/c/check-ring.c copies what a ring on one end of a veth pair
    receives into slabs of their exact size, checks them and prints each
    packet: what was sent into the other end, as expected()."""
    netns.veth("va", "vb")
    host = netns.mac("va")
    frames = live_frames(host)
    p = subprocess.Popen(netns.cmd(str(BUILD / "check-ring"), "va", str(snaplen), str(reinsert),
                                   str(slab), str(max_pkts), str(len(frames)), str(block), "64"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=SAN_ENV)
    try:
        assert p.stdout is not None and p.stdout.readline() == "ready\n", p.stderr
        t0 = time.time_ns()
        assert netns.send("vb", frames, tmp_path) == len(frames)
        t1 = time.time_ns()
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and err == "", err[-3000:]
    *lines, stats = out.splitlines()
    assert stats == f"kernel packets {len(frames)} drops 0"
    assert len(lines) == len(frames)
    for i, (line, f) in enumerate(zip(lines, frames, strict=True)):
        caplen, wire, flags, tci, linktype, ts, data = line.split(" ") + [""] * (
            7 - len(line.split(" ")))
        want = expected(f, snaplen, bool(reinsert), host)
        got = (bytes.fromhex(data), int(caplen), int(wire), int(flags), int(tci))
        assert got == want, (i, f.hex())
        assert int(linktype) == 1 and t0 <= int(ts) <= t1
