"""libpktipc, the C client, against real brokers: the same packets as the
Python client, out-of-order releases from another thread with every slab
back at the broker, a broker restart, a stream that tcpdump reads, bad use;
its protocol rules against the Python ones; its installation."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from conftest import PCAPS, ROOT, BrokerProc, all_captures, pktipc_cmd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pcapref import read_pcap
from test_protocol import frames

import pktipc
from pktipc import _cschema
from pktipc import _protocol as proto
from pktipc._synth import write_pcap

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


def c_prog(name: str, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(BIN / name), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kw)


def finish(p: subprocess.Popen[bytes], timeout: float = 60) -> tuple[int, bytes, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err.decode()


def fields(line: str) -> dict[str, str]:
    """"k1 v1 k2 v2 ..." as a dict."""
    words = line.split()
    return dict(zip(words[::2], words[1::2], strict=True))


# --- the protocol's rules ------------------------------------------------------------


def test_schema_header_is_generated_from_the_protocol() -> None:
    """clients/c/src/schema.h is what pktipc._cschema makes of _protocol.py;
    after changing the protocol: python -m pktipc._cschema > clients/c/src/schema.h"""
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
        stats = pktipc.broker_stats(b.name)
        (client,) = stats["clients"]
        assert client["name"] == "ooo" and client["attached"]
        assert client["held"] == 0 and client["queued"] == 0
        assert client["batches"] == int(got["batches"])
        assert stats["slabs"]["free"] == stats["slabs"]["count"] == 8
        assert stats["counters"]["protocol_errors"] == 0
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
        while not (clients := pktipc.broker_stats(b.name)["clients"]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert [(c["name"], c["group"], c["policy"]) for c in clients] == [
            ("w1", "workers", "drop")]
    finally:
        p.send_signal(signal.SIGINT)
        rc, _, err = finish(p)
    assert rc == 0, err


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


# --- installation ----------------------------------------------------------------------


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
    subprocess.run(["c++", "-Wall", "-Werror", "-fsyntax-only", *pkg("--cflags"), "-x", "c++",
                    "-"], input=b"#include <pktipc.h>\nint main() { return pktipc_fd(nullptr); }\n",
                   check=True)
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
