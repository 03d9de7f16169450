"""The C client against the Python client's NumPy path, on one broker setup.

    .venv/bin/python -m bench.cclient [--quick] [--packets N] [--loops L] [--reps R]

Builds libpktipc and bench/_cclientproc.c, generates a capture of 64-byte
frames in /dev/shm (the file is in memory), and serves it with the broker's
defaults (64 slabs of 1 MiB, credit 8, policy block), each run reading it
4 x L times. The order of the scenarios rotates at every repetition:

  c    1 Python client, NumPy descriptors (bench.offline's scenario c)
  C    1 C client walking the descriptors, reading the first byte of every packet
  Cd   the same through pktipc_dispatch's per-packet callback
  Cr   as C, then releasing every packet by itself, last first
  Cc   a C client (as C) and a NumPy client on one broker at once

For every client: packets per second delivered (from the start of the stream
to its end), and its own CPU time per packet while streaming (what it could
consume if the broker were not the limit). For the C clients, RELEASE
messages per batch. Every client is checked against libpcap's count and sum
of caplen. Writes bench/results/cclient-<date>.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .offline import (
    BENCH,
    ROOT,
    Ctx,
    Procs,
    Scenario,
    _med,
    compile_baselines,
    generate,
    machine,
    python_client,
    run_broker,
    save,
)

CDIR = ROOT / "clients" / "c"

SCENARIOS = [
    Scenario("c", "1 Python client, NumPy descriptors", 1, "numpy", 4),
    Scenario("C", "1 C client, descriptors + first byte", 1, "c-batch", 4),
    Scenario("Cd", "1 C client, pktipc_dispatch callback", 1, "c-dispatch", 4),
    Scenario("Cr", "1 C client, every packet released alone", 1, "c-release", 4),
    Scenario("Cc", "C client and NumPy client at once", 2, "c-batch+numpy", 4),
]


def build_client(tmp: Path) -> Path:
    subprocess.run(["make", "-s", "-C", str(CDIR), "lib"], check=True)
    libs = subprocess.run(["pkg-config", "--libs", "libzmq", "msgpack", "libpcap"], check=True,
                          capture_output=True, text=True).stdout.split()
    exe = tmp / "_cclientproc"
    subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{CDIR / 'include'}",
                    f"-I{ROOT / 'shm'}", "-o", str(exe), str(BENCH / "_cclientproc.c"),
                    str(CDIR / "build" / "lib" / "libpktipc.a"), *libs, "-pthread"], check=True)
    return exe


def per_client(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Each client's mode, rate, CPU per packet and release messages per batch."""
    out = []
    for c in run["clients"]:
        row = {"mode": c["mode"], "pps": c["pps"],
               "cpu_ns_per_pkt": c["cpu_stream_s"] / c["packets"] * 1e9}
        if "release_msgs" in c:
            row["release_msgs_per_batch"] = c["release_msgs"] / c["batches"]
        out.append(row)
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repetitions, per scenario and client mode; ratios are
    medians of ratios within a repetition (neighbours in time share the noise)."""
    out: dict[str, Any] = {}
    for sc in SCENARIOS:
        rs = [r for r in runs if r["scenario"] == sc.key]
        if not rs:
            continue
        modes: dict[str, Any] = {}
        for mode in dict.fromkeys(c["mode"] for r in rs for c in r["per_client"]):
            rows = [c for r in rs for c in r["per_client"] if c["mode"] == mode]
            modes[mode] = {k: _med([c[k] for c in rows]) for k in rows[0]
                           if k != "mode"}
        out[sc.key] = {"reps": len(rs), "complete": all(r["complete"] for r in rs),
                       "broker_core_share": _med([r["cpu_broker_stream_s"] / r["wall_s"]
                                                  for r in rs]),
                       "clients": modes}

    def value(key: str, mode: str, rep: int, field: str) -> float | None:
        for r in runs:
            if r["scenario"] == key and r["rep"] == rep:
                return float(next(c[field] for c in r["per_client"] if c["mode"] == mode))
        return None

    def ratio(num: tuple[str, str], den: tuple[str, str], field: str,
              inverse: bool = False) -> float | None:
        xs = []
        for rep in sorted({r["rep"] for r in runs}):
            a, b = value(*num, rep, field), value(*den, rep, field)
            if a and b:
                xs.append(b / a if inverse else a / b)
        return _med(xs) if xs else None

    out["ratios"] = {
        "C/c delivered": ratio(("C", "c-batch"), ("c", "numpy"), "pps"),
        "C/c by own CPU": ratio(("C", "c-batch"), ("c", "numpy"), "cpu_ns_per_pkt",
                                inverse=True),
        "Cd/C delivered": ratio(("Cd", "c-dispatch"), ("C", "c-batch"), "pps"),
        "Cr/C delivered": ratio(("Cr", "c-release"), ("C", "c-batch"), "pps"),
    }
    return out


def table(summary: dict[str, Any], packets: int, passes: int) -> str:
    lines = [f"\n64-byte frames: file of {packets:,} packets in /dev/shm, read {passes} times "
             "per run; medians",
             f"{'':3} {'scenario':42} {'client':10} {'Mpkt/s':>7} {'CPU ns':>7} "
             f"{'= Mpkt/s':>9} {'RELEASE':>8} {'broker':>7}",
             f"{'':3} {'':42} {'':10} {'got':>7} {'/pkt':>7} {'of CPU':>9} {'/batch':>8} "
             f"{'cores':>7}"]
    for sc in SCENARIOS:
        s = summary.get(sc.key)
        if s is None:
            continue
        for i, (mode, c) in enumerate(s["clients"].items()):
            rel = c.get("release_msgs_per_batch")
            lines.append(
                f"{sc.key if not i else '':3} {sc.what if not i else '':42} {mode:10} "
                f"{c['pps'] / 1e6:7.2f} {c['cpu_ns_per_pkt']:7.1f} "
                f"{1e3 / c['cpu_ns_per_pkt']:9.1f} {'' if rel is None else f'{rel:.2f}':>8} "
                + (f"{s['broker_core_share']:7.2f}" if not i else "")
                + ("" if s["complete"] else "  INCOMPLETE"))
    for name, x in summary["ratios"].items():
        if x is not None:
            lines.append(f"    ratio {name:18} {x:5.2f}")
    lines.append("\nMpkt/s got: packets the client received / seconds from the start of the "
                 "stream to its end.\nCPU ns/pkt: the client's own CPU (user + system, its "
                 "ZeroMQ thread included) while\nstreaming, per packet; \"= Mpkt/s of CPU\" is "
                 "its inverse: what one core of it would consume.\nbroker cores: the broker's "
                 "CPU seconds per second of stream (1.00: one core, busy).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cclient",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small file, 3 repetitions")
    ap.add_argument("--packets", type=int, help="64-byte packets (default 2,000,000; "
                                                "quick 300,000)")
    ap.add_argument("--loops", type=int, help="each run reads the file 4 x L times "
                                              "(default 3; quick 2)")
    ap.add_argument("--reps", type=int, help="repetitions (default 5; quick 3)")
    ap.add_argument("--out", type=Path,
                    help="JSON output (default bench/results/cclient-<date>.json)")
    a = ap.parse_args(argv)
    packets = a.packets or (300_000 if a.quick else 2_000_000)
    loops = a.loops or (2 if a.quick else 3)
    reps = a.reps or (3 if a.quick else 5)
    for tool in ("cc", "make", "pkg-config"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.cclient: {tool} is needed")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="pktipc-bench-"))
    pcap = Path(f"/dev/shm/pktipc-bench-{os.getpid()}-64.pcap")
    started = time.monotonic()
    host = machine()
    try:
        cexe = build_client(tmp)

        def client_cmd(server: str, name: str, mode: str) -> list[str]:
            if mode.startswith("c-"):
                return [str(cexe), server, name, mode]
            return python_client(server, name, mode)

        env = dict(os.environ, PKTIPC_RUNTIME_DIR=str(tmp / "run"))
        ctx = Ctx(procs, tmp, env, compile_baselines(tmp), loops=loops, client_cmd=client_cmd)
        secs = generate(pcap, packets, 64)
        ctx.expected[str(pcap)] = json.loads(subprocess.run(
            [str(ctx.bin / "pcap_read"), str(pcap)], capture_output=True, check=True).stdout)
        print(f"generated {pcap}: {packets:,} packets in {secs:.1f} s", flush=True)
        run_broker(ctx, SCENARIOS[0], pcap, passes=1)     # discarded: first-time costs

        runs: list[dict[str, Any]] = []
        for rep in range(reps):
            order = SCENARIOS[rep % len(SCENARIOS):] + SCENARIOS[:rep % len(SCENARIOS)]
            for sc in order:
                r = run_broker(ctx, sc, pcap)
                r.update(rep=rep, per_client=per_client(r))
                runs.append(r)
                rates = "  ".join(f"{c['mode']} {c['pps'] / 1e6:.2f}" for c in r["per_client"])
                print(f"rep {rep + 1}/{reps} {sc.key:3} Mpkt/s: {rates}"
                      + ("" if r["complete"] else "  INCOMPLETE"), flush=True)
        summary = summarize(runs)
        print(table(summary, packets, loops * 4))
        save("cclient", a.out, started, quick=a.quick, reps=reps, loops=loops,
             packets=packets, machine=host,
             broker="defaults: 64 slabs of 1 MiB, credit 8, policy block",
             summary=summary, runs=runs)
    finally:
        procs.kill_all()
        pcap.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
