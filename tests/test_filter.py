"""Per-client filters against a real broker: what a filtered client gets,
Python or C (libpktipc through pktipc-pcap), is exactly what tcpdump keeps
of the same captures; in a flow group, the members' filtered shares make up
the filtered stream exactly once; bad expressions get libpcap's one line."""

from __future__ import annotations

import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import PCAPS, all_captures, run_pktipc
from pcapref import Packet, PcapError, read_pcap
from test_cclient import BIN, built, c_pcap, finish  # noqa: F401 - built: autouse

import pktipc
from pktipc._tools.synth import write_pcap

EXPRESSIONS = ["tcp", "udp port 53", "vlan 100 and tcp", "ip6", "not arp"]
References = Callable[[str], dict[Path, list[Packet]]]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4000 frames of TCP and UDP flows, IPv4 and IPv6, some tagged VLAN 100."""
    f = tmp_path_factory.mktemp("synth") / "synth.pcap"
    with open(f, "wb") as out:
        write_pcap(out, 4000, flows=200, skew=None)
    return f


@pytest.fixture(scope="module")
def references(synth: Path, tmp_path_factory: pytest.TempPathFactory) -> References:
    """references(expr): for each capture (the shared ones libpcap reads
    whole, times aside, and the synthetic one), what `tcpdump -r FILE -w -
    EXPR` keeps of it, in nanoseconds; a capture is left out if tcpdump
    refuses the expression for its link type."""
    work = tmp_path_factory.mktemp("tcpdump")
    files = [synth]
    for p in all_captures():
        try:
            whole = read_pcap(str(p)).error is None
        except PcapError:
            whole = False
        if whole and not p.name.startswith(("time_", "timestamp_")):
            files.append(p)
    done: dict[str, dict[Path, list[Packet]]] = {}

    def get(expr: str) -> dict[Path, list[Packet]]:
        if expr not in done:
            done[expr] = {}
            for f in files:
                out = work / "out.pcap"
                r = subprocess.run(["tcpdump", "--time-stamp-precision=nano", "-r", str(f),
                                    "-w", str(out), expr], capture_output=True, timeout=60)
                if r.returncode == 0:
                    done[expr][f] = read_pcap(str(out)).packets
        return done[expr]

    return get


def as_ref(p: pktipc.Packet) -> Packet:
    return Packet(p.ts_ns, p.caplen, p.wirelen, bytes(p.data))


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_python_client_keeps_what_tcpdump_keeps(broker, references: References,
                                                expr: str) -> None:
    refs = references(expr)
    assert len(refs) > 40 and sum(map(len, refs.values())) > 200
    files = list(refs)
    b = broker(*(a for f in files for a in ("-r", str(f))))
    got: dict[int, list[Packet]] = defaultdict(list)
    with pktipc.connect(b.name, "f", filter=expr) as c:
        assert c.filter == expr
        for batch in c:
            with batch:
                for p in batch:
                    got[p.iface].append(as_ref(p))
        counted = c.counters
    for i, f in enumerate(files):
        assert got[i] == refs[f], f.name
    total = sum(len(read_pcap(str(f)).packets) for f in files)
    kept = sum(map(len, refs.values()))
    assert (counted.packets, counted.filtered) == (kept, total - kept)


@pytest.mark.parametrize("expr", EXPRESSIONS)
def test_c_client_keeps_what_tcpdump_keeps(broker, references: References, tmp_path: Path,
                                           expr: str) -> None:
    """libpktipc's opts.filter, through pktipc-pcap: Ethernet captures only
    (a pcap stream holds one link type)."""
    refs = {f: r for f, r in references(expr).items() if read_pcap(str(f)).linktype == 1}
    b = broker(*(a for f in refs for a in ("-r", str(f))))
    out = tmp_path / "c.pcap"
    rc, _, err = finish(c_pcap(out, b.name, *expr.split()))
    assert rc == 0, err
    assert read_pcap(str(out)).packets == [p for r in refs.values() for p in r]


def test_dump_keeps_what_tcpdump_keeps(broker, references: References, synth: Path,
                                       tmp_path: Path) -> None:
    """pktipc dump SERVER ... EXPR writes what tcpdump -r FILE -w - EXPR writes."""
    b = broker("-r", str(synth))
    out = tmp_path / "d.pcap"
    r = run_pktipc("dump", "--server", b.name, "-w", str(out), "vlan", "100", "and", "tcp")
    assert r.returncode == 0, r.stderr
    want = references("vlan 100 and tcp")[synth]
    assert 0 < len(want) < 4000 and read_pcap(str(out)).packets == want


def read_together(clients: list[pktipc.Client]) -> dict[str, list[tuple[int, Packet]]]:
    """(seq, packet) of what each client gets until end-of-stream, reading
    them in turn: a group's members are told end-of-stream together."""
    got: dict[str, list[tuple[int, Packet]]] = {c.name: [] for c in clients}
    reading = list(clients)
    deadline = time.monotonic() + 120
    while reading:
        assert time.monotonic() < deadline, {n: len(g) for n, g in got.items()}
        for c in list(reading):
            try:
                batch = c.next_batch(timeout=0.02)
            except pktipc.EndOfStream:
                reading.remove(c)
                continue
            if batch is not None:
                with batch:
                    got[c.name] += [(p.seq, as_ref(p)) for p in batch]
    return got


def test_flow_group_members_share_the_filtered_stream(broker, synth: Path,
                                                      references: References,
                                                      tmp_path: Path) -> None:
    """Three members of a flow group, two in Python and one in C, each with
    the filter: together they get every packet the filter keeps, once; a
    client of its own gets them all."""
    expr = "tcp or ip6"
    want = references(expr)[synth]
    b = broker("-r", str(synth), "--slab-size", "16k", "--wait-clients", "4")
    c_out = tmp_path / "member.pcap"
    member = c_pcap(c_out, "-g", "ids", b.name, expr)
    with pktipc.connect(b.name, "all", filter=expr) as whole, \
            pktipc.connect(b.name, "m1", group="ids", filter=expr) as m1, \
            pktipc.connect(b.name, "m2", group="ids", filter=expr) as m2:
        got = read_together([m1, m2, whole])
    rc, _, err = finish(member)
    assert rc == 0, err
    by_c = read_pcap(str(c_out)).packets
    assert [p for _, p in got["all"]] == want
    shares = sorted(got["m1"] + got["m2"])
    assert got["m1"] and got["m2"] and by_c
    # The C member's packets are those of the stream the Python members did not get.
    seq_of = {p: s for s, p in got["all"]}
    c_seqs = sorted(seq_of[p] for p in by_c)
    assert sorted([s for s, _ in shares] + c_seqs) == [s for s, _ in got["all"]]
    assert len(set(seq_of)) == len(want)        # no two packets alike: seq_of is exact


def test_set_filter_takes_effect_at_the_next_batch(broker, synth: Path,
                                                   references: References) -> None:
    everything = read_pcap(str(synth)).packets
    tcp = references("tcp")[synth]
    b = broker("-r", str(synth), "--slab-size", "16k")
    with pktipc.connect(b.name, "f", credit=1) as c:
        first = c.next_batch(timeout=10)
        assert first is not None
        with first:
            got = [as_ref(p) for p in first]
        c.set_filter("tcp")
        second = c.next_batch(timeout=10)
        assert second is not None
        with second:
            kept = [as_ref(p) for p in second]
        c.set_filter(None)
        assert c.filter is None
        rest = [as_ref(p) for p in c.packets(timeout=10)]
    assert got == everything[:len(got)]
    assert kept and all(p in tcp for p in kept)
    assert len(got) + c.counters.filtered + len(kept) + len(rest) == len(everything)
    assert rest == everything[-len(rest):]


def test_bad_expressions_get_one_line(broker, synth: Path, tmp_path: Path) -> None:
    b = broker("-r", str(synth), "--linger")
    with pytest.raises(pktipc.FilterError, match="filter 'tcp port': .*syntax error"):
        pktipc.connect(b.name, "bad", filter="tcp port")
    with pktipc.connect(b.name, "good") as c:
        with pytest.raises(pktipc.FilterError, match="syntax error"):
            c.set_filter("host")
        assert c.filter is None
    r = run_pktipc("dump", "--server", b.name, "-w", str(tmp_path / "x.pcap"), "tcp", "port")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.splitlines() == [
        "pktipc: error: filter 'tcp port': can't parse filter expression: syntax error"]
    p = subprocess.run([str(BIN / "pktipc-pcap"), b.name, "udp", "and"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        "pktipc-pcap: filter 'udp and': can't parse filter expression: syntax error"]


def test_a_filter_that_cannot_apply_to_a_source_is_refused(broker, synth: Path) -> None:
    """tcpdump refuses `tcp` on a D-Bus capture; so does a client whose
    broker serves one, naming the link type."""
    dbus = PCAPS / "unsupported-link-type-dbus.pcap"
    b = broker("-r", str(synth), "-r", str(dbus), "--linger")
    with pytest.raises(pktipc.FilterError, match=r"filter 'tcp': .*\(link type DBUS\)"):
        pktipc.connect(b.name, "f", filter="tcp")
