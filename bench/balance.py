"""Balance benchmark: one group of 1, 2 and 4 members, and two groups (2 + 1).

    .venv/bin/python -m bench.balance [--quick] [--packets N] [--loops L] [--reps R]

Generates a synthetic capture in /dev/shm (64-byte frames of 4,096 flows, each
as likely: this measures the balancing, not one elephant flow),
then runs, rotating the order at every repetition, each with members of two
kinds: `objects` (a Packet object per packet: per-packet work, what
balancing spreads) and `numpy` (descriptors only: per-batch work, what
balancing cannot spread, so it shows its cost):

  g1   broker -> group ids, 1 member (every batch whole: the reference)
  g2   broker -> group ids, 2 members sharing by flow
  g4   broker -> group ids, 4 members sharing by flow
  g21  broker -> group ids (2 members) and group rec (1 member): fan-out and balance

Every member is its own process (bench/_clientproc.py, reading its own
packets); the broker waits for all of them and is lossless. A
group's rate is the packets its members received together / the time from
the start of the stream to the last end-of-stream. Then the spread: all of
../shared/pcaps/tcpdump-tests served to a group of 2 and of 4 members, and
the coefficient of variation (stdev / mean) of the packets per member, next
to the same on the synthetic capture. Last, what the flow hash costs the
broker's ingest per packet (bench/baselines/flowhash_cost.c: hashing every
packet of the capture held in memory, beside only reading it). Prints a table
of medians and writes every run to bench/results/balance-<date>.json.
Nothing passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.offline import (
    BASELINES,
    CLIENT,
    PY,
    ROOT,
    RUN_TIMEOUT,
    Procs,
    Watchdog,
    _cpu,
    _wait_for,
    save,
)
from bench.offline import machine as machine_info

PCAPS = ROOT.parent / "shared" / "pcaps" / "tcpdump-tests"

# scenario -> members per group
SCENARIOS: dict[str, dict[str, int]] = {
    "g1": {"ids": 1}, "g2": {"ids": 2}, "g4": {"ids": 4}, "g21": {"ids": 2, "rec": 1},
}
MODES = ("objects", "numpy")


def cv(xs: list[int]) -> float:
    return statistics.pstdev(xs) / statistics.fmean(xs) if xs and any(xs) else float("nan")


def run(procs: Procs, tmp: Path, env: dict[str, str], groups: dict[str, int],
        files: list[Path], loops: int, seq: int, mode: str) -> dict[str, Any]:
    """One broker, the groups' members as processes; per-group rates and spread."""
    name = f"bal{os.getpid()}-{seq}"
    procs.brokers.append(name)
    members = [(g, f"{g}-{i}") for g, k in groups.items() for i in range(k)]
    serve = [PY, "-m", "pktipc", "serve", "--name", name, "--wait-clients", str(len(members)),
             "--loop", str(loops), *[a for f in files for a in ("-r", str(f))]]
    errlog = tmp / f"{name}.err"
    with open(errlog, "wb") as err:
        broker = procs.start(serve, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    clients: list[subprocess.Popen[bytes]] = []
    dog = Watchdog(procs, [broker], RUN_TIMEOUT)
    try:
        _wait_for(Path(env["PKTIPC_RUNTIME_DIR"]) / f"{name}.ctl", broker)
        for g, m in members:
            clients.append(procs.start([PY, str(CLIENT), name, m, mode, g], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       cwd=ROOT))
        dog.cancel()
        dog = Watchdog(procs, [broker, *clients], RUN_TIMEOUT)
        results = []
        for c in clients:
            rc, ru = procs.reap(c)
            stdout, errtext = c.communicate()
            if rc != 0:
                raise RuntimeError(f"client exited {rc}: {errtext.decode(errors='replace')}")
            r = json.loads(stdout.decode().strip().splitlines()[-1])
            r["cpu_s"] = _cpu(ru)
            results.append(r)
        brc, bru = procs.reap(broker)
    finally:
        dog.cancel()
        for p in (*clients, broker):
            procs.kill(p)
    if dog.fired or brc != 0:
        raise RuntimeError(f"broker exited {brc}: {errlog.read_text()}")
    t_go = max(r["t_attached"] for r in results)
    t_end = max(r["t_end"] for r in results)
    out: dict[str, Any] = {"wall_s": t_end - t_go, "cpu_broker_s": _cpu(bru), "groups": {}}
    for g in groups:
        rs = [r for r in results if r["group"] == g]
        packets = [r["packets"] for r in rs]
        out["groups"][g] = {
            "members": len(rs), "packets": sum(packets), "per_member": packets,
            "flows_per_member": [r["flows"] for r in rs],
            "pps": sum(packets) / (max(r["t_end"] for r in rs) - t_go),
            "cv": cv(packets) if len(rs) > 1 else 0.0,
            "cpu_members_s": sum(r["cpu_s"] for r in rs),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.balance", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller file, 3 repetitions")
    ap.add_argument("--packets", type=int)
    ap.add_argument("--loops", type=int)
    ap.add_argument("--reps", type=int)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    packets = a.packets or (200_000 if a.quick else 1_000_000)
    loops = a.loops or (2 if a.quick else 4)
    reps = a.reps or (3 if a.quick else 5)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="pktipc-balance-"))
    synth = Path(f"/dev/shm/pktipc-balance-{os.getpid()}.pcap")
    started = time.monotonic()
    host = machine_info()
    try:
        env = dict(os.environ, PKTIPC_RUNTIME_DIR=str(tmp / "run"))
        from pktipc._tools.synth import write_pcap

        with open(synth, "wb") as f:
            write_pcap(f, packets, sizes=(64,), flows=4096, rate_pps=1e6, skew=None)
        print(f"generated {synth}: {packets:,} packets of 64 bytes, 4,096 even flows",
              flush=True)
        seq = 0
        runs: list[dict[str, Any]] = []
        keys = [(k, m) for m in MODES for k in SCENARIOS]
        for rep in range(reps):
            for key, mode in keys[rep % len(keys):] + keys[:rep % len(keys)]:
                seq += 1
                r = run(procs, tmp, env, SCENARIOS[key], [synth],
                        loops if mode == "numpy" else 1, seq, mode)
                r.update(scenario=key, mode=mode, rep=rep)
                runs.append(r)
                print(f"rep {rep + 1}/{reps} {mode:7} {key:4} " + "  ".join(
                    f"{g}: {x['pps'] / 1e6:.2f} Mpkt/s cv {x['cv']:.3f}"
                    for g, x in r["groups"].items()), flush=True)
        captures = sorted(p for p in PCAPS.iterdir() if p.suffix in (".pcap", ".pcapng"))
        spread: dict[int, dict[str, Any]] = {}
        for members in (2, 4):
            seq += 1
            r = run(procs, tmp, env, {"ids": members}, captures, 1, seq, "flows")
            spread[members] = r["groups"]["ids"]
            print(f"real captures, {members} members: {spread[members]['per_member']} packets, "
                  f"cv {spread[members]['cv']:.3f}", flush=True)

        def median(mode: str, key: str, group: str, field: str) -> float:
            return statistics.median(float(r["groups"][group][field]) for r in runs
                                     if r["scenario"] == key and r["mode"] == mode)

        med = {f"{m}/{k}": {g: median(m, k, g, "pps") for g in SCENARIOS[k]}
               for m in MODES for k in SCENARIOS}
        cvs = {f"{m}/{k}": median(m, k, "ids", "cv") for m in MODES for k in SCENARIOS}
        print(f"\n{packets:,} x 64-byte packets (numpy: x {loops} passes), "
              f"{reps} repetitions, medians")
        print(f"{'':13} {'group ids Mpkt/s':>17} {'vs g1':>6} {'rec Mpkt/s':>11} {'cv ids':>7}")
        for m in MODES:
            ref = med[f"{m}/g1"]["ids"]
            for k in SCENARIOS:
                x = med[f"{m}/{k}"]
                rec = x.get("rec")
                print(f"{m + ' ' + k:13} {x['ids'] / 1e6:17.2f} {x['ids'] / ref:6.2f} "
                      f"{'' if rec is None else f'{rec / 1e6:.2f}':>11} {cvs[f'{m}/{k}']:7.3f}")
        for members, s in spread.items():
            print(f"real captures, {members} members: packets {s['per_member']}, cv {s['cv']:.3f}; "
                  f"flow hashes {s['flows_per_member']}")

        exe = tmp / "flowhash_cost"
        engine = ROOT / "pktipc" / "_broker" / "engine"
        subprocess.run(["gcc", "-O2", "-I", str(ROOT / "shm"), "-I", str(engine), "-o", str(exe),
                        str(BASELINES / "flowhash_cost.c"), str(engine / "flowhash.c"),
                        "-lpcap"], check=True)
        costs = [json.loads(subprocess.run([str(exe), str(synth)], capture_output=True,
                                           check=True).stdout) for _ in range(reps)]
        hash_cost = {k: statistics.median(c[k] for c in costs)
                     for k in ("ns_read", "ns_hash", "ns_hash_tunnels")}
        print(f"flow hash: {hash_cost['ns_hash'] - hash_cost['ns_read']:.1f} ns per packet "
              f"({hash_cost['ns_hash_tunnels'] - hash_cost['ns_read']:.1f} with --tunnel-hash) "
              f"beyond reading its headers ({hash_cost['ns_read']:.1f} ns)")

        save("balance", a.out, started, packets=packets, loops=loops, reps=reps,
             machine=host, medians_pps=med, cv=cvs, spread_real=spread,
             hash_cost_ns=hash_cost, runs=runs)
    finally:
        procs.kill_all()
        synth.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
