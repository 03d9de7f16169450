"""Seeds for the C fuzz targets (tests/c/fuzz-*.c), made from the shared
captures when they run, and the check of what the protocol decoder's
fuzzer found against the Python decoder.

    python tests/cfuzz.py seeds DIR          DIR/pcap, DIR/flowhash, DIR/select, DIR/proto
    python tests/cfuzz.py verdicts FUZZ-PROTO FILE-OR-DIR...
    python tests/cfuzz.py summary LOG        a fuzzer's run in one line
    python tests/cfuzz.py coverage EXPORT SOURCE [FUNCTION-REGEX]
                                             the coverage of SOURCE's functions in
                                             `llvm-cov export` output, in one line
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from conftest import all_captures
from pcapref import PcapError, read_pcap

from pktipc import _protocol as proto

TARGETS = ("pcap", "flowhash", "select", "proto")
SEED_BYTES = 16384          # a capture is cut to its first records within this
# fuzz-flowhash.c's LINKTYPES, in its order: the input's first byte indexes it
HASH_LINKTYPES = (1, 101, 228, 229, 113, 276, 0, 108, 104, 127)


def cut_capture(data: bytes, limit: int = SEED_BYTES) -> bytes:
    """The file's header and as many whole records (pcapng: blocks) as fit
    in `limit` bytes; the whole file when it is shorter, or not a capture."""
    if len(data) <= limit or len(data) < 24:
        return data
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        order = "<" if data[8:12] == b"\x4d\x3c\x2b\x1a" else ">"
        off = 0
        while off + 12 <= len(data):
            (n,) = struct.unpack_from(order + "I", data, off + 4)
            if n < 12 or off + n > limit:
                break
            off += n
        return data[:off] if off else data[:limit]
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    off = 24
    while off + 16 <= len(data):
        (cap,) = struct.unpack_from(order + "I", data, off + 8)
        if off + 16 + cap > limit:
            break
        off += 16 + cap
    return data[:off]


def proto_frames() -> list[bytes]:
    """A broker's every kind of message, as it sends them; the sources of
    a STATS reply are the shared captures."""
    e = proto.encode
    frames = [
        e("welcome", shm="/pktipc.b.1", epoch=7, layout=1, slot=0, credit=4, policy="block",
          heartbeat_ms=1000, liveness_ms=30000, group="default", balance="flow"),
        e("welcome", shm="/pktipc.ids.42", epoch=2**64 - 1, layout=2**32 - 1, slot=1023,
          credit=4096, policy="drop", heartbeat_ms=1, liveness_ms=2**32 - 1, group="ids-1",
          balance="round-robin"),
        e("batch", seq=0, slab=0, gen=0, n=1, members=[], mask=None),
        e("batch", seq=2**40, slab=3, gen=9, n=11, members=[4, 0, 1023], mask=b"\x55\x05"),
        e("batch", seq=5, slab=1, gen=1, n=8, members=[2**32 - 1], mask=b"\xff"),
        e("gap", **{"from": 10, "to": 2**64 - 1}),
        e("eos", error=None),
        e("eos", error="x.pcap: truncated dump file; tried to read 16 header bytes"),
        e("error", code="bad-field", text="hello.credit: bad value"),
        e("evict", code="too-slow", text="silent for 30 s"),
        e("heartbeat"),
        e("hello", name="c", group=None, policy="drop", credit=None, pid=1, balance=None),
        e("release", seqs=[1, 2, 3]),
    ]
    sources = []
    for f in all_captures()[:24]:
        try:
            ref = read_pcap(str(f))
        except PcapError:
            continue
        sources.append({"name": f.name[:47], "linktype": ref.linktype,
                        "packets": len(ref.packets), "error": ref.error, "ts": 1.5})
    frames.append(e("stats_reply", stats={"counters": {"packets": 10, "clients": 2},
                                          "sources": sources}))
    return frames


def _packets() -> Iterable[tuple[int, bytes]]:
    """(link type, bytes) of the shared captures' packets, a few of each file."""
    for f in all_captures():
        try:
            ref = read_pcap(str(f))
        except PcapError:
            continue
        seen: set[bytes] = set()
        for p in ref.packets:
            if p.data[:64] not in seen and len(seen) < 6:
                seen.add(p.data[:64])
                yield ref.linktype, p.data


def write_seeds(out: Path) -> dict[str, int]:
    """Every target's seeds into out/TARGET/; how many each got."""
    for t in TARGETS:
        (out / t).mkdir(parents=True, exist_ok=True)
        for old in (out / t).iterdir():
            old.unlink()
    n = dict.fromkeys(TARGETS, 0)

    def put(target: str, name: str, data: bytes) -> None:
        (out / target / name).write_bytes(data)
        n[target] += 1

    for f in all_captures():
        put("pcap", f.name, cut_capture(f.read_bytes()))
    words = b""
    for i, (linktype, data) in enumerate(_packets()):
        if linktype in HASH_LINKTYPES:
            first = HASH_LINKTYPES.index(linktype) | (0x80 if i % 2 else 0)
            put("flowhash", f"packet-{i}", bytes([first]) + data[:512])
        words += data[12:44]
    # select: members, the one asking, mask or not, slots; then hashes (and mask)
    for i in range(16):
        members = i % 6
        head = bytes([members, i, i % 2]) + b"".join(
            struct.pack("<I", (s * 2654435761 + i) & 0xFFFFFFFF) for s in range(members))
        body = words[i * 997 % max(1, len(words) - 600):][: 64 + i * 33]
        put("select", f"batch-{i}", head + body)
    for i, frame in enumerate(proto_frames()):
        put("proto", f"frame-{i}", frame)
    return n


def python_verdict(frame: bytes) -> str:
    try:
        return "ok " + proto.decode(frame, proto.MAX_BROKER_FRAME)[0]
    except proto.RemoteProtocolError:
        return "refused"


def input_id(data: bytes) -> str:
    """tests/c/harness.h's input_id(): FNV-1a, as 16 hex digits."""
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def reports(fuzzer: Path, files: list[Path]) -> dict[str, str]:
    """What a fuzz target reports of each file run through it once, by
    input id (libFuzzer may run an input more than once)."""
    out: dict[str, str] = {}
    env = {**os.environ, "PKTIPC_FUZZ_REPORT": "1"}
    for start in range(0, len(files), 500):
        chunk = files[start : start + 500]
        r = subprocess.run([str(fuzzer), *map(str, chunk)], capture_output=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr.decode(errors="replace")[-3000:]
        for line in r.stdout.decode().splitlines():
            ident, _, what = line.partition(" ")
            out[ident] = what
    return out


def verdicts_differ(fuzz_proto: Path, files: list[Path]) -> list[tuple[Path, str, str]]:
    """(file, C verdict, Python verdict) of each frame the two decoders judge
    otherwise."""
    got = reports(fuzz_proto, files)
    differ = []
    for f in files:
        data = f.read_bytes()
        c, py = got[input_id(data)], python_verdict(data)
        if not c.startswith(py):
            differ.append((f, c, py))
    return differ


def summary(log: str) -> str:
    """Executions, their rate, the edges reached of those instrumented (the
    target's code and its harness), features and corpus of a libFuzzer run."""
    edges = sum(int(n) for n in re.findall(r"Loaded \d+ modules +\((\d+) inline", log))
    done = re.findall(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)", log, re.M)
    rate = re.search(r"^stat::average_exec_per_sec:\s+(\d+)", log, re.M)
    if not done or not rate or not edges:
        return "no summary in the log"
    runs, cov, ft, corp = map(int, done[-1])
    return (f"{runs} runs, {int(rate.group(1))} exec/s, cov {cov} of {edges} edges "
            f"({100 * cov / edges:.0f}%), ft {ft}, corpus {corp}")


def coverage(export: dict[str, Any], source: Path, functions: str = "") -> str:
    """Functions entered, code regions and branch directions taken, of the
    functions defined in `source` (those matching `functions`, if given),
    from `llvm-cov export -format=text` output."""
    want = source.resolve()
    entered = nfunc = regions = nregions = taken = nbranches = 0
    for f in export["data"][0]["functions"]:
        if Path(f["filenames"][0]).resolve() != want or not re.search(functions, f["name"]):
            continue
        nfunc += 1
        entered += f["regions"][0][4] > 0
        code = [r for r in f["regions"] if r[5] == 0 and r[7] == 0]     # file 0, code regions
        nregions += len(code)
        regions += sum(r[4] > 0 for r in code)
        for b in f["branches"]:
            nbranches += 2
            taken += (b[4] > 0) + (b[5] > 0)
    if not nfunc:
        return f"no function of {source.name} in the profile"
    return (f"{source.name}: functions {entered}/{nfunc}, regions {regions}/{nregions} "
            f"({100 * regions / max(nregions, 1):.0f}%), branch directions {taken}/{nbranches} "
            f"({100 * taken / max(nbranches, 1):.0f}%)")


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "seeds":
        counts = write_seeds(Path(sys.argv[2]))
        print("seeds: " + ", ".join(f"{t} {k}" for t, k in counts.items()))
        return 0
    if len(sys.argv) >= 4 and sys.argv[1] == "verdicts":
        files = sorted(f for a in sys.argv[3:] for f in
                       (Path(a).iterdir() if Path(a).is_dir() else [Path(a)]))
        differ = verdicts_differ(Path(sys.argv[2]), files)
        for f, c, py in differ:
            print(f"{f}: C {c!r}, Python {py!r}")
        print(f"verdicts: {len(files)} frames, {len(differ)} judged otherwise by C and Python")
        return 1 if differ else 0
    if len(sys.argv) in (4, 5) and sys.argv[1] == "coverage":
        export = json.loads(Path(sys.argv[2]).read_text())
        print("  " + coverage(export, Path(sys.argv[3]), *sys.argv[4:]))
        return 0
    if len(sys.argv) == 3 and sys.argv[1] == "summary":
        print("  " + summary(Path(sys.argv[2]).read_text(errors="replace")))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
