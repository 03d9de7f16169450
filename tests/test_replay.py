"""Every capture of the tcpdump test suite, replayed through a real broker to
two clients at once, arrives exactly as libpcap reads it; what `pktipc dump`
writes is read back by tshark, tcpdump and libpcap."""

from __future__ import annotations

import struct
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import all_captures, pktipc_cmd, run_pktipc
from pcapref import read_pcap

import pktipc

Record = tuple[int, int, int, int, bytes]   # ts_ns, caplen, wirelen, linktype, bytes


def reference(path: Path) -> list[Record]:
    ref = read_pcap(str(path))
    assert ref.error is None, f"{path.name}: {ref.error}"
    return [(ts, cap, wire, ref.linktype, data) for ts, cap, wire, data in ref.packets]


def collect(client: pktipc.Client) -> tuple[dict[int, list[Record]], list[int]]:
    """Packets by source index, and every seq in arrival order."""
    per_iface: dict[int, list[Record]] = defaultdict(list)
    seqs: list[int] = []
    for batch in client:
        with batch:
            for p in batch:
                per_iface[p.iface].append((p.ts_ns, p.caplen, p.wirelen, p.linktype,
                                           bytes(p.data)))
                seqs.append(p.seq)
    return per_iface, seqs


def tshark_fields(path: Path, *fields: str) -> list[list[str]]:
    args = ["tshark", "-r", str(path), "-T", "fields"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    return [line.split("\t") for line in out.stdout.splitlines()]


def test_every_capture_to_two_clients(broker, tmp_path: Path) -> None:
    files = all_captures()
    expected = {i: reference(f) for i, f in enumerate(files)}
    args = [a for f in files for a in ("-r", str(f))]
    # A small slab size makes the 600-odd packets span many batches, so
    # batches hold packets of several files and credit runs out.
    b = broker(*args, "--wait-clients", "2", "--slab-size", "256k", "--slabs", "4")
    out = tmp_path / "all.pcapng"
    dump = subprocess.Popen(pktipc_cmd("dump", "--server", b.name, "--client", "dumper",
                                       "--format", "pcapng", "-w", str(out)),
                            stderr=subprocess.PIPE, text=True)
    with pktipc.connect(b.name, "checker") as client:
        assert [i.name for i in client.ifaces] == [f.name for f in files]
        assert [i.linktype for i in client.ifaces] == [read_pcap(str(f)).linktype
                                                       for f in files]
        got, seqs = collect(client)
    assert dump.wait(timeout=60) == 0, dump.stderr.read() if dump.stderr else ""
    assert b.wait() == 0

    assert seqs == list(range(len(seqs)))
    for i, f in enumerate(files):
        assert got.get(i, []) == expected[i], f"{f.name}: packets differ from libpcap's"

    # tshark reads the pcapng the second client wrote: per interface, the
    # same packets with the same lengths and nanosecond timestamps.
    rows = tshark_fields(out, "frame.interface_name", "frame.cap_len", "frame.len",
                         "frame.time_epoch")
    by_name: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
    for name, cap, wire, ts in rows:
        by_name[name].append((int(cap), int(wire), ts))
    for i, f in enumerate(files):
        want = [(cap, wire, f"{t // 10**9}.{t % 10**9:09d}")
                for t, cap, wire, _, _ in expected[i]]
        assert by_name.get(f.name, []) == want, f"{f.name}: tshark reads other packets"


PCAP_TS_END = 2**32 * 10**9      # pcap's seconds are an unsigned 32-bit count


def _pcap_holds(f: Path) -> bool:
    return all(rec[0] < PCAP_TS_END for rec in reference(f))


def _by_linktype() -> dict[int, list[Path]]:
    """The captures whose times a pcap file can hold, by link type."""
    groups: dict[int, list[Path]] = defaultdict(list)
    for f in all_captures():
        if _pcap_holds(f):
            groups[read_pcap(str(f)).linktype].append(f)
    return groups


@pytest.mark.parametrize("linktype", sorted(_by_linktype()))
def test_dump_pcap_read_back(broker, tmp_path: Path, linktype: int) -> None:
    """Files of one link type served together; `pktipc dump` writes one
    nanosecond pcap that libpcap reads byte for byte and tshark counts."""
    files = _by_linktype()[linktype]
    b = broker(*[a for f in files for a in ("-r", str(f))])
    out = tmp_path / "out.pcap"
    r = run_pktipc("dump", "--server", b.name, "-w", str(out))
    assert r.returncode == 0, r.stderr
    assert b.wait() == 0
    want = [rec for f in files for rec in reference(f)]
    got = reference(out)
    assert got == want
    assert out.read_bytes()[:4] == b"\x4d\x3c\xb2\xa1"   # nanosecond pcap

    originals = [subprocess.run(["tshark", "-r", str(f)], capture_output=True)
                 for f in files]
    if all(o.returncode == 0 for o in originals):
        assert len(tshark_fields(out, "frame.number")) == len(want)
    else:
        # tshark cannot decode this link type at all; it must say the same of ours.
        mine = subprocess.run(["tshark", "-r", str(out)], capture_output=True, text=True)
        assert mine.returncode != 0 and "network type" in mine.stderr


@pytest.mark.parametrize("f", [f for f in all_captures() if not _pcap_holds(f)],
                         ids=lambda f: f.name)
def test_dump_refuses_times_pcap_cannot_hold(broker, tmp_path: Path, f: Path) -> None:
    """A time past 2106 (pcapng holds it, pcap cannot): `dump -w x.pcap`
    writes the packets before it, then stops with one line saying why and
    what to use; `--format pcapng` writes every packet as it was."""
    want = reference(f)
    first = next(i for i, rec in enumerate(want) if rec[0] >= PCAP_TS_END)
    b = broker("-r", str(f))
    out = tmp_path / "out.pcap"
    r = run_pktipc("dump", "--server", b.name, "-w", str(out))
    assert r.returncode == 1
    assert r.stderr.startswith(f"pktipc: error: packet {first + 1}: its time, ")
    assert r.stderr.endswith(": a pcap file cannot hold it (use --format pcapng)\n")
    assert r.stderr.count("\n") == 1
    assert reference(out) == want[:first]
    ng = tmp_path / "out.pcapng"
    b = broker("-r", str(f))
    r = run_pktipc("dump", "--server", b.name, "--format", "pcapng", "-w", str(ng))
    assert r.returncode == 0, r.stderr
    assert reference(ng) == want
    rows = tshark_fields(ng, "frame.time_epoch")
    assert rows == [[f"{t // 10**9}.{t % 10**9:09d}"] for t, *_ in want]


@pytest.mark.parametrize("linktypes", [(1, 1), (1, 101)])
def test_empty_pcapng_names_every_source(broker, tmp_path: Path,
                                         linktypes: tuple[int, int]) -> None:
    """A stream with no packet, written as pcapng, is a file tshark reads,
    and libpcap too where its sources share a link type (libpcap 1.10 reads
    one link type per file): a section header and an interface block per
    source."""
    files = []
    for i, linktype in enumerate(linktypes):
        f = tmp_path / f"empty{i}.pcap"
        f.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, linktype))
        files += ["-r", str(f)]
    b = broker(*files)
    out = tmp_path / "out.pcapng"
    r = run_pktipc("dump", "--server", b.name, "--format", "pcapng", "-w", str(out))
    assert r.returncode == 0, r.stderr
    assert b.wait() == 0
    if linktypes[0] == linktypes[1]:
        assert reference(out) == []
    info = subprocess.run(["capinfos", "-I", str(out)], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert "Number of interfaces in file: 2" in info.stdout
    names = {1: "Ethernet (1 - ether)", 101: "Raw IP (7 - rawip)"}
    assert [line.split("= ", 1)[1] for line in info.stdout.splitlines()
            if "Encapsulation = " in line] == [names[lt] for lt in linktypes]


def test_dump_to_stdout_into_tcpdump(broker) -> None:
    f = next(f for f in all_captures() if f.name == "dns_udp.pcap")
    b = broker("-r", str(f))
    pipeline = subprocess.run(
        " ".join(pktipc_cmd("dump", "--server", b.name, "-w", "-"))
        + " | tcpdump -nn --nano -r - 2>/dev/null",
        shell=True, capture_output=True, text=True, timeout=60)
    direct = subprocess.run(["tcpdump", "-nn", "--nano", "-r", str(f)],
                            capture_output=True, text=True)
    assert pipeline.returncode == 0
    assert pipeline.stdout == direct.stdout and direct.stdout


def test_dump_count_stops_early(broker, tmp_path: Path) -> None:
    f = next(f for f in all_captures() if f.name == "DECnet_Phone.pcap")
    want = reference(f)
    assert len(want) > 5
    b = broker("-r", str(f), "--linger")
    out = tmp_path / "five.pcap"
    r = run_pktipc("dump", "--server", b.name, "-c", "5", "-w", str(out))
    assert r.returncode == 0, r.stderr
    assert reference(out) == want[:5]


Rec = tuple[int, int, int, bytes]      # ts seconds, caplen field, len field, data


def classic_pcap(recs: list[Rec], order: str = "<", minor: int = 4,
                 snaplen: int = 65535) -> bytes:
    """A classic microsecond pcap, header and records written as given."""
    head = struct.pack(order + "IHHiIII", 0xA1B2C3D4, 2, minor, 0, 0, snaplen, 1)
    return head + b"".join(struct.pack(order + "iIII", sec, 0, cap, wire) + data
                           for sec, cap, wire, data in recs)


def assert_served_as_libpcap_reads(broker, path: Path, *args: str) -> list[Record]:
    want = reference(path)
    b = broker("-r", str(path), *args)
    with pktipc.connect(b.name, "c") as client:
        got, _ = collect(client)
    assert got[0] == want
    assert b.wait() == 0
    return want


def test_records_past_the_snap_length(broker, tmp_path: Path) -> None:
    """A classic pcap is read from a mapping until a record is out of the
    ordinary (here: longer than the file's snap length); libpcap reads from
    that record on, so what is served is what libpcap reads, in either
    byte order."""
    for order in "<>":
        recs = [(i, n, n + 5, bytes([i]) * n)
                for i, n in enumerate((60, 70, 80, 150, 64, 99, 100))]
        path = tmp_path / f"snap{order == '<'}.pcap"
        path.write_bytes(classic_pcap(recs, order, snaplen=100))
        want = assert_served_as_libpcap_reads(broker, path)
        assert [r[1] for r in want] == [60, 70, 80, 100, 64, 99, 100]     # libpcap truncates


def test_old_minor_version_goes_through_libpcap(broker, tmp_path: Path) -> None:
    """pcap 2.3 files may hold caplen and len the wrong way round, which
    libpcap puts right: they are read by libpcap, not from the mapping."""
    # A writer of that time put the wire length first: 40 bytes kept of 60.
    path = tmp_path / "v23.pcap"
    path.write_bytes(classic_pcap([(i, 60, 40, bytes([i]) * 40) for i in range(5)], minor=3))
    want = assert_served_as_libpcap_reads(broker, path)
    assert [(r[1], r[2]) for r in want] == [(40, 60)] * 5       # libpcap swapped them


def test_file_grown_after_mapping(broker, tmp_path: Path) -> None:
    """Records appended once the file was mapped are read too (by libpcap,
    from where the mapping ends)."""
    recs = [(i, 64, 64, bytes([i]) * 64) for i in range(7)]
    path = tmp_path / "growing.pcap"
    whole = classic_pcap(recs)
    path.write_bytes(whole[: 24 + 3 * 80])                    # 3 records of 16 + 64 bytes
    b = broker("-r", str(path), "--wait-clients", "1")     # mapped when opened, at start
    with open(path, "ab") as f:
        f.write(whole[24 + 3 * 80 :])
    want = reference(path)
    with pktipc.connect(b.name, "c") as client:
        got, _ = collect(client)
    assert len(want) == 7 and got[0] == want
    assert b.wait() == 0
