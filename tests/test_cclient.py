"""libpktipc, the C client, against real brokers: the same packets as the
Python client, out-of-order releases from another thread with every slab
back at the broker, a broker restart, a stream that tcpdump reads, groups
shared with Python members (by flow and round-robin), bad use; its protocol
rules against the Python ones; its installation."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from conftest import PCAPS, ROOT, BrokerProc, all_captures, pktipc_cmd, settled_stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcapref import Packet, read_pcap
from pktipc._shm import ffi, lib
from test_groups import Member, flow_of, start
from test_protocol import frames

import pktipc
from pktipc import _protocol as proto
from pktipc._tools import cschema as _cschema
from pktipc._tools.synth import write_pcap

CDIR = ROOT / "clients" / "c"
BUILD = CDIR / "build"
BIN = BUILD / "bin"


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    """The library, examples and test programs, as `make` leaves them."""
    subprocess.run(["make", "-s", "-C", str(CDIR), "all"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    f = tmp_path_factory.mktemp("csynth") / "synth.pcap"
    with open(f, "wb") as out:
        write_pcap(out, 20_000, sizes=(60, 1400), rate_pps=100_000)
    return f


@pytest.fixture(scope="module")
def flows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20,000 packets spread evenly over 300 flows, both directions."""
    f = tmp_path_factory.mktemp("cflows") / "flows.pcap"
    with open(f, "wb") as out:
        write_pcap(out, 20_000, flows=300, seed=11, sizes=(64, 128, 256), skew=None)
    return f


def c_prog(name: str, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / name), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def c_pcap(out: Path, *args: str) -> subprocess.Popen[bytes]:
    """pktipc-pcap writing to a file, which nobody need read while it runs
    (a full pipe would stall the client, and the group with it)."""
    with open(out, "wb") as f:
        return subprocess.Popen([str(BIN / "pktipc-pcap"), *args], stdout=f,
                                stderr=subprocess.PIPE)


def finish(p: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, bytes, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err.decode()


def fields(line: str) -> dict[str, str]:
    """"k1 v1 k2 v2 ..." as a dict."""
    words = line.split()
    return dict(zip(words[::2], words[1::2], strict=True))


# --- the protocol's rules ------------------------------------------------------------


def test_schema_header_is_generated_from_the_protocol() -> None:
    """clients/c/src/schema.h is what pktipc._tools.cschema makes of _protocol.py;
    after changing the protocol: python -m pktipc._tools.cschema > clients/c/src/schema.h"""
    assert (CDIR / "src" / "schema.h").read_text() == _cschema.render()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(frames(sorted(proto.SCHEMAS)), min_size=50, max_size=50))
def test_c_decoder_takes_what_python_takes(batch: list[bytes]) -> None:
    """Every frame gets the same verdict from the C decoder as from
    _protocol.decode: accepted as the same message type, or refused."""
    data = b"".join(struct.pack("<I", len(f)) + f for f in batch)
    out = subprocess.run([str(BUILD / "tests" / "test-proto"), "--verdicts"], input=data,
                         capture_output=True, check=True).stdout.decode().splitlines()
    assert len(out) == len(batch)
    for frame, verdict in zip(batch, out, strict=True):
        try:
            want = "ok " + proto.decode(frame, proto.MAX_BROKER_FRAME)[0]
        except proto.RemoteProtocolError:
            want = "refused"
        assert verdict.startswith(want), (frame, verdict)


# --- against real brokers ----------------------------------------------------------------


def ethernet_captures() -> list[Path]:
    return [f for f in all_captures() if f.suffix == ".pcap" and read_pcap(str(f)).linktype == 1
            and read_pcap(str(f)).error is None]


@pytest.mark.parametrize("which", ["ethernet", "linux-sll"])
def test_c_and_python_clients_get_the_same_packets(broker, synth: Path, tmp_path: Path,
                                                    which: str) -> None:
    """The same stream through pktipc-pcap (C, the dispatch API) and through
    `pktipc dump` (Python), both attached to one broker: byte for byte the
    same pcap, holding every packet of the files."""
    files = ([*ethernet_captures(), synth] if which == "ethernet"
             else [PCAPS / "resp_1_benchmark.pcap"])
    b = broker(*[a for f in files for a in ("-r", str(f))], "--wait-clients", "2",
               "--slab-size", "256k", "--credit", "3")
    c = c_prog("pktipc-pcap", "-n", "c-pcap", b.name)
    py = tmp_path / "py.pcap"
    r = subprocess.run(pktipc_cmd("dump", "--server", b.name, "--client", "py", "-w", str(py)),
                       capture_output=True, text=True, timeout=120)
    rc, out, err = finish(c)
    assert r.returncode == 0 and rc == 0, (r.stderr, err)
    assert out == py.read_bytes()
    got = read_pcap_bytes(out, tmp_path)
    want = [p for f in files for p in read_pcap(str(f)).packets]
    assert len(got) == len(want) > 100 and got == want


def read_pcap_bytes(data: bytes, tmp_path: Path) -> list[Any]:
    f = tmp_path / "c.pcap"
    f.write_bytes(data)
    ref = read_pcap(str(f))
    assert ref.error is None
    return ref.packets


def test_tcpdump_reads_the_c_stream(broker) -> None:
    """pktipc-pcap NAME | tcpdump -r -: tcpdump prints what it prints for the file."""
    capture = PCAPS / "DECnet_Phone.pcap"
    b = broker("-r", str(capture))
    tcpdump = ["tcpdump", "-n", "-v", "--time-stamp-precision", "nano", "-r"]
    piped = subprocess.run(f"{BIN / 'pktipc-pcap'} {b.name} | {' '.join(tcpdump)} -",
                           shell=True, capture_output=True, text=True, timeout=60)
    direct = subprocess.run([*tcpdump, str(capture)], capture_output=True, text=True,
                            timeout=60)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == direct.stdout and piped.stdout.count("\n") >= 139


def test_out_of_order_consumer_gives_every_slab_back(broker, synth: Path) -> None:
    """pktipc-pool releases every packet from its worker thread, at random;
    with the client still attached, the broker has every slab back, and it
    got one RELEASE per slab at most."""
    want = read_pcap(str(synth)).packets
    b = broker("-r", str(synth), "--loop", "2", "--linger", "--slab-size", "64k",
               "--slabs", "8", "--credit", "4")
    p = c_prog("pktipc-pool", "-n", "ooo", "-p", "block", "-s", "700", "-l", "60", b.name)
    try:
        assert p.stdout is not None
        line = p.stdout.readline().decode()
        got = fields(line)
        assert int(got["packets"]) == 2 * len(want), line
        assert int(got["bytes"]) == 2 * sum(len(x.data) for x in want)
        assert got["released"] == got["packets"] and got["release_errors"] == "0"
        assert got["held"] == "0" and got["drops"] == "0"
        assert got["batches_released"] == got["batches"]
        assert 0 < int(got["release_msgs"]) <= int(got["batches"]) > 40
        stats = settled_stats(b.name, lambda s: s.slabs.free == s.slabs.count)
        (client,) = stats.clients
        assert client.name == "ooo" and client.attached
        assert client.held == 0 and client.queued == 0
        assert client.batches == int(got["batches"])
        assert stats.slabs.free == stats.slabs.count == 8
        assert stats.counters.protocol_errors == 0
    finally:
        p.send_signal(signal.SIGINT)
        rc, _, err = finish(p)
    assert rc == 0, err


def test_c_client_follows_a_restarted_broker(broker, synth: Path, runtime_dir: Path) -> None:
    """kill -9 of the broker under a counting C client, then a new broker of
    the same name: the client attaches to it by itself and counts on."""
    first = broker("-r", str(synth), "--loop", "0", "--speed", "0.5", "--heartbeat", "0.2")
    p = c_prog("pktipc-count", "-n", "counter", "-i", "1", first.name)
    second = None
    try:
        assert p.stdout is not None
        before = fields(p.stdout.readline().decode())
        assert int(before["packets"]) > 0
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        second = BrokerProc(first.name, ["-r", str(synth), "--loop", "0", "--speed", "0.5"],
                            runtime_dir)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            now = fields(p.stdout.readline().decode())
            if now["reconnects"] == "1" and int(now["packets"]) > int(before["packets"]) + 1000:
                break
        else:
            raise AssertionError("the C client did not carry on with the new broker")
    finally:
        p.send_signal(signal.SIGINT)
        rc, out, err = finish(p)
        if second is not None:
            second.stop()
    assert rc == 0, err
    total = fields(out.decode().strip().splitlines()[-1].removeprefix("total "))
    assert total["reconnects"] == "1"
    assert not list(Path("/dev/shm").glob(f"pktipc.{first.name}.*"))


def test_group_is_told_to_the_broker(broker) -> None:
    b = broker("-r", str(PCAPS / "dns_udp.pcap"), "--wait-clients", "2", "--linger")
    p = c_prog("pktipc-count", "-n", "w1", "-g", "workers", b.name)
    try:
        deadline = time.monotonic() + 10
        while not (clients := pktipc.broker_stats(b.name).clients):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [(c.name, c.group, c.policy) for c in clients] == [
            ("w1", "workers", "drop")]
    finally:
        p.send_signal(signal.SIGINT)
        rc, _, err = finish(p)
    assert rc == 0, err


# --- groups shared with Python members ------------------------------------------------------


def attached(server: str, count: int) -> dict[str, int]:
    """Waits until `count` clients are attached: their slots, by name."""
    deadline = time.monotonic() + 15
    while len(clients := pktipc.broker_stats(server).clients) < count:
        assert time.monotonic() < deadline, "the clients did not attach"
        time.sleep(0.02)
    return {c.name: c.slot for c in clients}


@pytest.mark.parametrize("traffic", ["captures", "generated"])
def test_c_and_python_members_share_a_flow_group(broker, flows: Path, tmp_path: Path,
                                                  traffic: str) -> None:
    """pktipc-pcap (C) and `pktipc dump` (Python) in one flow group, and a
    client of its own group: each member writes, in order, exactly the
    packets whose flow hash its slot owns (pktipc_flow_owner over the two
    slots); together they hold what the client of its own group got."""
    files = ethernet_captures() if traffic == "captures" else [flows]
    b = broker(*[a for f in files for a in ("-r", str(f))], "--wait-clients", "3",
               "--slab-size", "256k", "--credit", "3")
    c_out, py_out, rec_out = tmp_path / "c.pcap", tmp_path / "py.pcap", tmp_path / "rec.pcap"
    c = c_pcap(c_out, "-n", "c-member", "-g", "ids", "-b", "flow", b.name)
    py = subprocess.Popen(pktipc_cmd("dump", "--server", b.name, "--client", "py-member",
                                     "--group", "ids", "-w", str(py_out)),
                          stderr=subprocess.PIPE, text=True)
    slots = attached(b.name, 2)
    rec = subprocess.run(pktipc_cmd("dump", "--server", b.name, "--client", "rec",
                                    "-w", str(rec_out)),
                         capture_output=True, text=True, timeout=120)
    rc, _, err = finish(c)
    _, py_err = py.communicate(timeout=60)
    assert (rc, py.returncode, rec.returncode) == (0, 0, 0), (err, py_err, rec.stderr)

    everything = read_pcap(str(rec_out)).packets
    assert everything == [p for f in files for p in read_pcap(str(f)).packets]
    members = ffi.new("uint32_t[]", [slots["c-member"], slots["py-member"]])

    def owner(p: Packet) -> int:
        h = lib.pkb_flow_hash(p.data, len(p.data), 1, 0)
        return int(members[lib.pktipc_flow_owner(h, members, 2)])

    got_c, got_py = read_pcap(str(c_out)).packets, read_pcap(str(py_out)).packets
    assert got_c == [p for p in everything if owner(p) == slots["c-member"]]
    assert got_py == [p for p in everything if owner(p) == slots["py-member"]]
    assert Counter(got_c) + Counter(got_py) == Counter(everything)
    assert min(len(got_c), len(got_py)) > len(everything) // 5
    if traffic == "generated":
        # Read from the bytes, independently of the C: each flow, both
        # ways, reached one member.
        seen: dict[tuple[Any, ...], set[tuple[int, bytes]]] = {}
        for who, got in enumerate((got_c, got_py)):
            for p in got:
                seen.setdefault(flow_of(p.data), set()).add((who, p.data[6:12]))
        assert len(seen) == 300
        assert all(len({who for who, _ in ways}) == 1 for ways in seen.values())
        both_ways = [next(iter(ways))[0] for ways in seen.values() if len(ways) == 2]
        assert len(both_ways) > 250 and 0 < sum(both_ways) < len(both_ways)


def test_c_and_python_members_take_turns(broker, flows: Path, tmp_path: Path) -> None:
    """A round-robin group of a Python member, which chose the mode, and
    pktipc-pcap, which joins it without asking: whole batches in turn,
    every packet to one of them."""
    want = read_pcap(str(flows)).packets
    b = broker("-r", str(flows), "--wait-clients", "2", "--slab-size", "16k", "--linger")
    py = Member(b.name, "py", "rr", balance="round-robin")
    start(py)
    c = c_pcap(tmp_path / "c.pcap", "-n", "c", "-g", "rr", b.name)
    got_py = py.finish()
    rc, _, err = finish(c)
    assert rc == 0, err
    batches = pktipc.broker_stats(b.name).counters.batches
    assert all(n == own for _, n, own in py.batches)        # whole batches
    got_c = read_pcap(str(tmp_path / "c.pcap")).packets
    assert got_c == [p for seq, p in enumerate(want) if seq not in got_py]
    assert [bytes(d) for _, (_, _, d) in sorted(got_py.items())] == \
        [p.data for seq, p in enumerate(want) if seq in got_py]
    # In turn: the C member's packets fall in the gaps between the Python
    # member's batches, one C batch to each gap.
    runs = [seq for seq in range(len(want))
            if seq not in got_py and (seq == 0 or seq - 1 in got_py)]
    assert len(py.batches) > 20 and len(runs) == batches - len(py.batches)
    assert abs(len(runs) - len(py.batches)) <= 1


def test_out_of_order_consumer_in_a_group(broker, synth: Path) -> None:
    """pktipc-pool shares a flow group with a Python member and releases
    its share packet by packet from its worker, at random: every packet to
    one of them, every slab back at the broker, no release refused."""
    want = read_pcap(str(synth)).packets
    b = broker("-r", str(synth), "--loop", "2", "--linger", "--wait-clients", "2",
               "--slab-size", "64k", "--slabs", "8", "--credit", "4")
    py = Member(b.name, "py", "pool")
    start(py)
    p = c_prog("pktipc-pool", "-n", "ooo", "-g", "pool", "-p", "block", "-s", "700", b.name)
    got_py = py.finish()
    rc, out, err = finish(p)
    assert rc == 0, err
    got = fields(out.decode())
    assert int(got["packets"]) + len(got_py) == 2 * len(want)
    assert 0 < len(got_py) < 2 * len(want) * 4 // 5 and int(got["packets"]) > len(want) // 5
    assert got["released"] == got["packets"] and got["release_errors"] == "0"
    assert got["held"] == "0" and got["batches_released"] == got["batches"]
    assert int(got["release_msgs"]) <= int(got["batches"])
    stats = settled_stats(b.name, lambda s: s.slabs.free == s.slabs.count)
    assert stats.slabs.free == stats.slabs.count == 8
    assert stats.counters.protocol_errors == 0


def test_c_member_joins_and_is_refused_by_mode(broker, flows: Path) -> None:
    """A C member takes its group's mode when it asks for none, and is
    refused, in one line, when it asks for the other."""
    b = broker("-r", str(flows), "--wait-clients", "2")
    py = Member(b.name, "w1", "ids")
    start(py)
    for prog in ("pktipc-count", "pktipc-pcap", "pktipc-pool"):
        rc, out, err = finish(c_prog(prog, "-n", "w2", "-g", "ids", "-b", "round-robin", b.name))
        assert rc == 1 and err.count("\n") == 1, err
        assert err == f"{prog}: broker '{b.name}' refused 'w2': group 'ids' balances by flow, " \
                      "not round-robin\n"
        rc, out, err = finish(c_prog(prog, "-b", "hash", b.name))
        assert rc == 2 and err == f"{prog}: -b takes flow or round-robin, not hash\n"
    rc, out, err = finish(c_prog("pktipc-count", "-n", "w2", "-g", "ids", "-p", "block", b.name))
    assert rc == 0, err
    total = fields(out.decode().splitlines()[-1].removeprefix("total "))
    assert (total["group"], total["balance"]) == ("ids", "flow")
    assert int(total["packets"]) + len(py.finish()) == 20_000


# --- bad use ---------------------------------------------------------------------------


def test_examples_say_what_is_wrong(broker) -> None:
    b = broker("-r", str(PCAPS / "dns_udp.pcap"), "--wait-clients", "2")
    with pktipc.connect(b.name, "taken"):
        for prog in ("pktipc-count", "pktipc-pcap", "pktipc-pool"):
            rc, out, err = finish(c_prog(prog, "-n", "taken", b.name))
            assert rc == 1 and err.count("\n") == 1, err
            assert "refused 'taken': a client named 'taken' is already attached" in err
            rc, out, err = finish(c_prog(prog, "nobody-here"))
            assert rc == 1 and "broker 'nobody-here' is not running" in err, err
            rc, out, err = finish(c_prog(prog, "-n", "bad/name", b.name))
            assert rc == 1 and "client name 'bad/name'" in err, err
            rc, out, err = finish(c_prog(prog, "-C", "0", b.name))
            assert rc == 2 and "usage" not in err and "between 1 and 4096" in err
            rc, out, err = finish(c_prog(prog))
            assert rc == 2 and err.startswith("usage: ")


def test_pcap_stream_ends_early_with_an_error(broker, tmp_path: Path) -> None:
    """A capture cut short: the packets before the cut, then a one-line error."""
    whole = (PCAPS / "DECnet_Phone.pcap").read_bytes()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(whole[: len(whole) - 50])
    b = broker("-r", str(cut))
    rc, out, err = finish(c_prog("pktipc-pcap", b.name))
    assert rc == 1 and err.startswith("pktipc-pcap: stream ended early: ") and err.count("\n") == 1
    assert len(read_pcap_bytes(out, tmp_path)) == 138


def test_pcap_refuses_a_time_past_2106(broker, tmp_path: Path) -> None:
    """pcap's seconds are an unsigned 32-bit count: a later time is refused
    in one line, never wrapped into 32 bits."""
    b = broker("-r", str(PCAPS / "time_2107.pcapng"))
    rc, out, err = finish(c_prog("pktipc-pcap", b.name))
    assert rc == 1 and err == ("pktipc-pcap: packet 1: its time, 4323283200000000000 ns after "
                               "1970, is outside what a pcap file can hold (1970 to 2106-02-07 "
                               "06:28:15 UTC)\n")
    assert read_pcap_bytes(out, tmp_path) == []


# --- installation ----------------------------------------------------------------------

# A C++ program using the headers' inline helpers: slot 7's share of four
# packets, two of them masked out, and the sequence number of its last packet.
CXX_PROGRAM = b"""#include <pktipc.h>
#include <cstdio>
int main()
{
    struct pktipc_pkt p[4] = {};
    const uint8_t mask = 0x0b;
    uint32_t members[1] = {7}, out[4];
    uint32_t k = pktipc_select(p, 4, &mask, members, 1, 7, out);
    struct pktipc_batch b = {};
    b.seq = 38;
    b.index = out;
    std::printf("%u %llu\\n", k, (unsigned long long)pktipc_batch_seq(&b, k - 1));
    return pktipc_fd(nullptr) != -PKTIPC_EINVAL;
}
"""



def test_install_and_pkg_config(broker, tmp_path: Path) -> None:
    """make install PREFIX=...; then a program built with pkg-config's flags
    alone, against the shared library and against the static one, runs."""
    prefix = tmp_path / "prefix"
    subprocess.run(["make", "-s", "-C", str(CDIR), "install", f"PREFIX={prefix}"], check=True,
                   capture_output=True)
    env = dict(os.environ, PKG_CONFIG_PATH=str(prefix / "lib" / "pkgconfig"))

    def pkg(*args: str) -> list[str]:
        out = subprocess.run(["pkg-config", *args, "pktipc"], env=env, check=True,
                             capture_output=True, text=True).stdout
        return out.split()

    assert pkg("--modversion") == [version("pktipc")]
    assert (prefix / "include" / "pktipc" / "pktipc_shm.h").exists()
    src = CDIR / "examples" / "pktipc-count.c"
    shared, static = tmp_path / "count-shared", tmp_path / "count-static"
    libs = pkg("--static", "--libs")
    subprocess.run(["cc", "-Wall", "-Werror", *pkg("--cflags"), "-o", str(shared), str(src),
                    *pkg("--libs")], check=True)
    subprocess.run(["cc", "-Wall", "-Werror", *pkg("--cflags"), "-o", str(static), str(src),
                    *[("-l:libpktipc.a" if a == "-lpktipc" else a) for a in libs]], check=True)
    # C++ programs (Zeek, for one) include the header too.
    cxx = tmp_path / "count-cxx"
    subprocess.run(["c++", "-Wall", "-Wextra", "-Werror", *pkg("--cflags"), "-o", str(cxx),
                    "-x", "c++", "-", *pkg("--libs")], input=CXX_PROGRAM, check=True)
    assert subprocess.run([str(cxx)], env=dict(os.environ, LD_LIBRARY_PATH=str(prefix / "lib")),
                          capture_output=True, text=True).stdout == "3 41\n"
    b = broker("-r", str(PCAPS / "DECnet_Phone.pcap"), "--wait-clients", "3")
    # The static build runs with no library path, the installed example finds
    # its library beside it; the shared build is shown where the library is.
    runs = [(static, {}), (prefix / "bin" / "pktipc-count", {}),
            (shared, {"LD_LIBRARY_PATH": str(prefix / "lib")})]
    procs = [subprocess.Popen([str(exe), "-n", exe.name, "-p", "block", b.name],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dict(os.environ, **extra)) for exe, extra in runs]
    for p in procs:
        rc, out, err = finish(p)
        assert rc == 0, err
        assert fields(out.decode().splitlines()[-1].removeprefix("total "))["packets"] == "139"


# --- the ABI ----------------------------------------------------------------------------

# A consumer built against version 1's pktipc_opts (before `balance` and
# `filter`), and one built against a newer header, with a field this
# library does not know.
OLD_CONSUMER = r"""
#include <stddef.h>
#include <stdio.h>
#include <string.h>
struct pktipc_client;
struct opts_v1 {
    size_t sz; const char *server, *name, *group; int policy; unsigned credit;
    int timeout_ms, reconnect_ms; char *errbuf;
};
struct opts_next { struct opts_v1 v1; int balance; unsigned tx_frames, tx_frame_size;
                   const char *filter; int unknown; };
struct batch { unsigned long long seq; unsigned count; const void *pkts, *index, *base;
               unsigned long long t; void *s; };
int pktipc_open(const void *o, struct pktipc_client **c);
int pktipc_next_batch(struct pktipc_client *c, struct batch *b, int timeout_ms);
int pktipc_release_batch(struct pktipc_client *c, struct batch *b);
void pktipc_close(struct pktipc_client *c);
const char *pktipc_version(void);
int main(int argc, char **argv)
{
    char err[256] = "";
    struct pktipc_client *c;
    struct opts_v1 o = {sizeof(o), argv[1], "old", NULL, 1, 0, -1, 0, err};
    int r = pktipc_open(&o, &c);
    printf("version %s, open %d %s\n", pktipc_version(), r, err);
    if (r)
        return 1;
    unsigned long long packets = 0;
    struct batch b;
    while ((r = pktipc_next_batch(c, &b, 10000)) > 0) {
        packets += (unsigned)r;
        pktipc_release_batch(c, &b);
    }
    printf("packets %llu end %d\n", packets, r);
    pktipc_close(c);
    struct opts_next n = {{sizeof(struct opts_next), argv[1], "newer", NULL, 1, 0, -1, 0, err},
                          0, 0, 0, NULL, 7};
    printf("unknown field set: %d\n", pktipc_open(&n, &c));
    n.unknown = 0;
    r = pktipc_open(&n, &c);
    printf("newer: %d\n", r);
    if (r == 0)
        pktipc_close(c);
    return 0;
}
"""


def test_a_consumer_built_against_version_1_runs(broker, tmp_path: Path) -> None:
    """A program built against version 1's pktipc_opts (smaller) runs
    against this library, which defaults what it did not pass; one built
    against a newer, larger one runs too, if what is new is zero."""
    src, exe = tmp_path / "old.c", tmp_path / "old"
    src.write_text(OLD_CONSUMER)
    lib = BUILD / "lib"
    r = subprocess.run(["gcc", "-o", str(exe), str(src), "-L", str(lib), "-lpktipc",
                        f"-Wl,-rpath,{lib}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    f = PCAPS / "dns_udp.pcap"
    b = broker("-r", str(f), "--wait-clients", "1", "--linger")
    out = subprocess.run([str(exe), b.name], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == [
        "version 0.1.0, open 0 ", "packets 2 end -10", "unknown field set: -1", "newer: 0"]
    dyn = subprocess.run(["readelf", "-d", str(lib / "libpktipc.so")], capture_output=True,
                         text=True).stdout
    assert "Library soname: [libpktipc.so.1]" in dyn
    syms = subprocess.run(["nm", "-D", "--defined-only", str(lib / "libpktipc.so")],
                          capture_output=True, text=True).stdout.split()
    assert {s for s in syms if s.startswith("pktipc_")} == {
        f"pktipc_{n}@@PKTIPC_1" for n in (
            "open", "close", "fd", "next_batch", "pkt_data", "release", "release_batch",
            "dispatch", "stats", "group", "balance", "iface_count", "iface", "strerror",
            "geterr", "linktype_to_dlt", "version")} | {
        f"pktipc_tx_{n}@@PKTIPC_1.1" for n in ("alloc", "send", "flush")}
