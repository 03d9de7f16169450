"""The Python client's filter and its asyncio edge, each beside what a user
would pick instead, in one run.

    .venv/bin/python -m bench.pyclient            # about 3 minutes
    .venv/bin/python -m bench.pyclient --quick    # under a minute

1. Filter cost per packet, "tcp port 80" over 64-byte frames (78 with an
   IPv6 header, TCP and a VLAN tag) of TCP and UDP flows, laid in 1 MiB
   slabs as the broker lays them: in C, pktipc_filter_run (one call per
   slab) against libpcap's own pcap_offline_filter loop and a loop that only
   reads the bytes the expression looks at (bench/baselines/filter_cost.c);
   from Python, the client's filter (one cffi call per slab) against doing
   it in Python per packet, by hand on the bytes or with dpkt.
2. The asyncio client against the blocking one: a broker serving the same
   capture (in /dev/shm, looped) to one client process (bench/_aioproc.py),
   sync and aio alternating, reading batches (the NumPy path) or every
   packet through loop()'s callback. Rate = packets ÷ (end-of-stream − first
   batch); own CPU per packet beside it.

Writes bench/results/pyclient-<date>.json and prints the tables of
bench/README.md's "The Python client: filter and asyncio".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.offline import BASELINES, ROOT, machine, save
from pktipc._paths import runtime_dir

PY = sys.executable
EXPR = "tcp port 80"
PROC = ROOT / "bench" / "_aioproc.py"


def generate(path: Path, packets: int) -> None:
    from pktipc._tools.synth import write_pcap

    with open(path, "wb", buffering=1 << 20) as f:
        write_pcap(f, packets, sizes=(64,), flows=256, rate_pps=1e6)


# --- 1. the filter ---------------------------------------------------------------------


def c_cost(tmp: Path, pcap: Path, passes: int) -> dict[str, Any]:
    exe = tmp / "filter_cost"
    subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", f"-I{ROOT / 'shm'}", "-o", str(exe),
                    str(BASELINES / "filter_cost.c"), str(ROOT / "shm" / "pktipc_filter.c"),
                    "-lpcap"], check=True)
    r = subprocess.run([str(exe), str(pcap), EXPR, str(passes)], capture_output=True,
                       text=True, check=True)
    return dict(json.loads(r.stdout))


def slabs_of(pcap: Path, packets: int) -> list[tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]]:
    """The file's first `packets` frames in 1 MiB slabs: (slab bytes,
    descriptors), descriptors first in each slab as the broker writes them,
    each frame 8-byte aligned after them."""
    from pktipc import PKT_DTYPE

    raw = pcap.read_bytes()
    frames: list[tuple[bytes, int]] = []
    off = 24
    while off < len(raw) and len(frames) < packets:
        caplen, wirelen = struct.unpack_from("<II", raw, off + 8)
        frames.append((raw[off + 16:off + 16 + caplen], wirelen))
        off += 16 + caplen
    size = 1 << 20
    per = size // (PKT_DTYPE.itemsize + 64)
    out = []
    for start in range(0, len(frames), per):
        chunk = frames[start:start + per]
        slab = bytearray(size)
        desc = np.zeros(len(chunk), dtype=PKT_DTYPE)
        at = per * PKT_DTYPE.itemsize
        for i, (data, wirelen) in enumerate(chunk):
            if at + len(data) > size:
                desc = desc[:i]
                break
            slab[at:at + len(data)] = data
            desc[i]["data_off"], desc[i]["caplen"], desc[i]["wirelen"] = at, len(data), wirelen
            at += (len(data) + 7) & ~7
        desc["linktype"] = 1
        slab[:len(desc) * PKT_DTYPE.itemsize] = desc.tobytes()
        out.append((np.frombuffer(slab, dtype=np.uint8), desc))
    return out


def by_hand(b: memoryview) -> bool:
    """tcp port 80, as one writes it in Python: Ethernet (untagged: libpcap's
    expression leaves VLAN frames out unless it says `vlan`), IPv4 (not a
    later fragment) or IPv6 (TCP as the next header), the ports."""
    off, et = 14, b[12] << 8 | b[13]
    if et == 0x0800:
        if b[off + 9] != 6 or (b[off + 6] << 8 | b[off + 7]) & 0x1FFF:
            return False
        off += (b[off] & 0xF) * 4
    elif et == 0x86DD:
        if b[off + 6] != 6:
            return False
        off += 40
    else:
        return False
    sport, dport = struct.unpack_from("!HH", b, off)
    return 80 in (sport, dport)


def with_dpkt(b: memoryview) -> bool:
    import dpkt

    eth = dpkt.ethernet.Ethernet(bytes(b))
    if getattr(eth, "vlan_tags", None):
        return False
    tcp = getattr(eth.data, "data", None)
    return isinstance(tcp, dpkt.tcp.TCP) and 80 in (tcp.sport, tcp.dport)


def py_cost(pcap: Path, packets: int, reps: int) -> dict[str, Any]:
    from pktipc._shm import ffi

    from pktipc._client.session import _Filter

    slabs = slabs_of(pcap, packets)
    f = _Filter(EXPR, [SimpleNamespace(linktype=1)])     # type: ignore[list-item]
    views = [[s.data[o:o + n] for o, n in zip(d["data_off"].tolist(), d["caplen"].tolist(),
                                                      strict=True)] for s, d in slabs]
    n = sum(len(d) for _, d in slabs)

    def pktipc_filter() -> int:
        return sum(len(f.run(ffi.from_buffer(s), d, None)) for s, d in slabs)

    def python(check: Any) -> Any:
        return lambda: sum(sum(map(check, vs)) for vs in views)

    variants = {"pktipc": pktipc_filter, "by_hand": python(by_hand), "dpkt": python(with_dpkt)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    matched: dict[str, int] = {}
    order = list(variants)
    for rep in range(reps):
        for k in (order if rep % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            matched[k] = variants[k]()
            times[k].append((time.perf_counter() - t0) * 1e9 / n)
    if len(set(matched.values())) != 1:
        raise RuntimeError(f"the variants disagree: {matched}")
    return {"packets": n, "matched": matched["pktipc"],
            **{f"{k}_ns": statistics.median(v) for k, v in times.items()},
            **{f"{k}_runs_ns": v for k, v in times.items()}}


# --- 2. asyncio against blocking --------------------------------------------------------


def one_stream(pcap: Path, loops: int, edge: str, style: str, tag: str) -> dict[str, Any]:
    name = f"pyclient{os.getpid()}-{tag}"
    broker = subprocess.Popen([PY, "-m", "pktipc", "serve", "--name", name, "-r", str(pcap),
                               "--loop", str(loops), "--wait-clients", "1"],
                              stderr=subprocess.PIPE, text=True)
    ok = False
    try:
        sock = runtime_dir() / f"{name}.ctl"
        deadline = time.monotonic() + 30
        while not sock.exists():
            if broker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker {name} did not start")
            time.sleep(0.01)
        client = subprocess.run([PY, str(PROC), name, "c", edge, style], capture_output=True,
                                text=True, timeout=900)
        if client.returncode != 0:
            raise RuntimeError(f"client {edge}/{style}: {client.stderr.strip()[-500:]}")
        rec = dict(json.loads(client.stdout))
        ok = True
    finally:
        if not ok:
            broker.terminate()          # it cleans up after itself on SIGTERM
        try:
            broker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            broker.terminate()          # it cleans up after itself on SIGTERM
            broker.wait(timeout=30)
    rec["mpps"] = rec["packets"] / (rec["t_end"] - rec["t_first"]) / 1e6
    rec["cpu_ns_per_packet"] = rec["cpu_s"] * 1e9 / rec["packets"]
    return rec


def aio_vs_sync(pcap: Path, packets: int, reps: int, loops: dict[str, int]
                ) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for style, n_loops in loops.items():
        runs: dict[str, list[dict[str, Any]]] = {"sync": [], "aio": []}
        ratios = []
        for rep in range(reps):
            pair = ("sync", "aio") if rep % 2 == 0 else ("aio", "sync")
            for edge in pair:
                rec = one_stream(pcap, n_loops, edge, style, f"{style}-{rep}-{edge}")
                if rec["packets"] != packets * n_loops:
                    raise RuntimeError(f"{edge}/{style}: {rec['packets']} packets, "
                                       f"{packets * n_loops} served")
                runs[edge].append(rec)
            ratios.append(runs["aio"][-1]["mpps"] / runs["sync"][-1]["mpps"])
        out[style] = {
            "packets": packets * n_loops,
            **{f"{e}_mpps": statistics.median(r["mpps"] for r in rs) for e, rs in runs.items()},
            **{f"{e}_cpu_ns": statistics.median(r["cpu_ns_per_packet"] for r in rs)
               for e, rs in runs.items()},
            "ratio_median": statistics.median(ratios), "ratios": ratios, "runs": runs}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.pyclient", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer packets and repetitions")
    ap.add_argument("--out", type=Path, help="the JSON record (default bench/results/...)")
    a = ap.parse_args(argv)
    started = time.monotonic()
    packets = 200_000 if a.quick else 1_000_000
    reps = 3 if a.quick else 5
    loops = {"batches": 10 if a.quick else 30, "loop": 1 if a.quick else 3}
    info = machine()
    pcap = Path(f"/dev/shm/pktipc-bench-pyclient-{os.getpid()}.pcap")
    try:
        generate(pcap, packets)
        with tempfile.TemporaryDirectory(prefix="pktipc-bench-") as tmp:
            c = c_cost(Path(tmp), pcap, 15 if a.quick else 31)
        py = py_cost(pcap, min(packets, 100_000 if a.quick else 300_000), reps)
        aio = aio_vs_sync(pcap, packets, reps, loops)
    finally:
        pcap.unlink(missing_ok=True)
    print(f"filter '{EXPR}', 64-byte frames, ns per packet (medians):")
    print("| | ns per packet | × pktipc |\n|---|---:|---:|")
    base = c["pktipc_filter_run_ns"]
    for label, v in (("C: pktipc_filter_run, one call per slab", base),
                     ("C: libpcap's pcap_offline_filter loop", c["pcap_offline_filter_ns"]),
                     ("C: reading the bytes only", c["read_only_ns"]),
                     ("Python: the client's filter, one cffi call per slab", py["pktipc_ns"]),
                     ("Python: by hand on each packet's bytes", py["by_hand_ns"]),
                     ("Python: dpkt on each packet", py["dpkt_ns"])):
        print(f"| {label} | {v:.1f} | {v / base:.2f} |")
    print(f"(C minima: pktipc {c['pktipc_min_ns']:.1f}, libpcap {c['libpcap_min_ns']:.1f}, "
          f"reading {c['read_only_min_ns']:.1f})")
    print("\nasyncio against blocking, one client, Mpkt/s (medians):")
    print("| reading | sync Mpkt/s | aio Mpkt/s | aio ÷ sync | sync CPU ns/pkt | "
          "aio CPU ns/pkt |\n|---|---:|---:|---:|---:|---:|")
    for style, r in aio.items():
        print(f"| {style} | {r['sync_mpps']:.2f} | {r['aio_mpps']:.2f} | "
              f"{r['ratio_median']:.2f} | {r['sync_cpu_ns']:.0f} | {r['aio_cpu_ns']:.0f} |")
    save("pyclient", a.out, started, machine=info, filter_c=c, filter_python=py,
         aio_vs_sync=aio, loadavg_after=os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
