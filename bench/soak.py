"""Soak: a broker serving for minutes or hours while clients come and go
(some say BYE, some are killed), beside two steady clients.

    .venv/bin/python -m bench.soak [--minutes M] [--rate PPS] [--churn SEC] [--live]
                                   [--every SEC] [--out FILE]

The source is a 100,000-packet synthetic capture replayed for ever at RATE
packets/s (--loop 0 --realtime), or with --live (root) a veth pair in a
namespace of its own, the C generator (bench/baselines/gen.c) sending RATE
64-byte frames a second into it. Two steady clients, each a process of its
own, read everything: one `block`, one `drop` (on a file they check every
packet's bytes against the capture; live, that none is missing). Meanwhile a
new client starts every CHURN seconds with a random policy, reads for 0.5-3 s
and says BYE; at every start, each churning client still running is killed
with SIGKILL with a chance of one in ten (about four in ten end that way).
Live, --allow-block names the steady `block` client and the churning ones.

Every EVERY seconds it samples the broker's memory (private: RssAnon +
RssFile, and PSS) and its counters. The report: private memory at the start
(one minute in: the first clients and batches have come by then), at the end
and at most, its trend over the run (MiB an hour, least squares after the
first minute), and every packet lost by stage: the kernel (the capture
socket's drops), the broker, the steady clients (skipped for them, and what
they found missing) and the churning ones. Writes
bench/results/soak-<date>.json. Not a test: run it by hand (it takes minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pktipc
from bench.hostile import Env, memory
from bench.offline import BASELINES, machine, save
from pktipc._tools.synth import write_pcap

PROC = Path(__file__).resolve().parent / "_hostileproc.py"

CHURNER = """
import random, sys, time, pktipc
c = pktipc.connect(sys.argv[1], sys.argv[2], policy=random.choice(["drop", "block"]))
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    b = c.next_batch(timeout=0.2)
    if b is not None:
        with b:
            sum(p.caplen for p in b)
c.close()
"""


def private_kb(pid: int) -> int:
    return memory(pid).get("private_kb", 0)


def _slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else 0.0


def soak(env: Env, a: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(7)
    name = env.name("soak")
    steady_names = {"steady-block": "block", "steady-drop": "drop"}
    gen = None
    if a.live:
        nsx = env.nsx()
        genbin = env.tmp / "gen"
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(genbin),
                        str(BASELINES / "gen.c")], check=True)
        broker = env.broker(name, "-i", "va", "--allow-block", "steady-block,churn*", wrap=nsx)
        steady = {n: env.start([sys.executable, str(PROC), "good", name, n, pol, "-"])
                  for n, pol in steady_names.items()}
    else:
        cap = env.shm("soak")
        with open(cap, "wb") as f:
            write_pcap(f, 100_000, rate_pps=a.rate)
        broker = env.broker(name, "-r", str(cap), "--loop", "0", "--realtime",
                            "--wait-clients", "2")
        steady = {n: env.start([sys.executable, str(PROC), "good", name, n, pol, str(cap)])
                  for n, pol in steady_names.items()}
    deadline = time.monotonic() + 30
    while len(pktipc.broker_stats(name).clients) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError("the steady clients did not attach")
        time.sleep(0.05)
    if a.live:
        count = int(a.rate * (a.minutes * 60 + 3600))      # (stopped at the end)
        gen = env.start([*nsx, str(genbin), "vb", str(count), "64", str(a.rate)])
    t0 = time.monotonic()
    timeline: list[dict[str, Any]] = []
    churners: list[subprocess.Popen[bytes]] = []
    started = killed = failed = 0
    missed: list[dict[str, Any]] = []
    last: Mapping[str, Any] = pktipc.broker_stats(name, timeout=10).reply
    died = ""
    next_sample = t0
    i = 0
    try:
        while time.monotonic() - t0 < a.minutes * 60:
            if broker.poll() is not None:
                died = f"the broker exited {broker.returncode}: {env.stderr(name)[-2000:]}"
                print(died, file=sys.stderr, flush=True)
                break
            now = time.monotonic()
            if now >= next_sample:
                next_sample += a.every
                try:
                    st = pktipc.broker_stats(name, timeout=10).reply
                except pktipc.PktipcError as e:     # (a loaded machine: a missed sample)
                    missed.append({"t": round(now - t0, 1), "error": str(e)})
                    continue
                last = st
                per = {c["name"]: c for c in st["clients"]}
                timeline.append({
                    "t": round(now - t0, 1), **memory(broker.pid),
                    "packets": st["counters"]["packets"],
                    "batches": st["counters"]["batches"],
                    "clients": len(st["clients"]),
                    "kernel_drops": sum(s.get("kernel_drops", 0) for s in st["sources"]),
                    "client_drops": st["counters"]["client_drops"],
                    "steady_drops": {n: per[n]["drops"] for n in steady_names if n in per}})
                x = timeline[-1]
                print(f"{x['t']:7.0f} s  private {x.get('private_kb', 0) / 1024:6.1f} MiB  "
                      f"{x['packets']:>12,} packets  {x['clients']:2} clients  "
                      f"kernel drops {x['kernel_drops']:,}  skipped {x['client_drops']:,}  "
                      f"started {started} killed {killed}", flush=True)
            time.sleep(a.churn)
            i += 1
            churners.append(env.start(
                [sys.executable, "-c", CHURNER, name, f"churn{i}", str(rng.uniform(0.5, 3))],
                out=False))
            started += 1
            for p in [p for p in churners if rng.random() < 0.1 and p.poll() is None]:
                env.procs.kill(p)           # some die without a word
                killed += 1
            for p in [p for p in churners if p.poll() is not None]:
                rc, _ = env.procs.reap(p)
                failed += rc not in (0, -9)
            churners = [p for p in churners if p.poll() is None]
        elapsed = time.monotonic() - t0
        end_mem = memory(broker.pid) or {k: v for k, v in timeline[-1].items()
                                          if k.endswith("_kb")}
        if gen is not None:
            env.stop(gen)
            time.sleep(1)
        st = last
        for _ in range(3):
            with contextlib.suppress(pktipc.PktipcError):
                st = pktipc.broker_stats(name, timeout=10).reply
                break
    finally:
        for p in churners:
            env.procs.kill(p)
            env.procs.reap(p)
        if gen is not None and gen.poll() is None:
            env.stop(gen)
        rc = env.stop(broker)
    outs = {n: env.output(p) for n, p in steady.items()}
    c = st["counters"]
    per = {x["name"]: x for x in st["clients"]}
    steady_skipped = {n: per[n]["drops"] for n in steady_names if n in per}
    warm = [(x["t"] / 3600, x["private_kb"] / 1024) for x in timeline if x["t"] >= 60]
    start = next((x for x in timeline if x["t"] >= 60), timeline[0])
    return {
        "source": "live veth, gen.c 64-byte frames" if a.live else "file, --loop 0 --realtime",
        "minutes": elapsed / 60, "rate_pps": a.rate, "churn_s": a.churn,
        "broker_exit": rc, "broker_died": died, "traceback": "Traceback" in env.stderr(name),
        "missed_samples": missed,
        "churners": {"started": started, "killed": killed, "failed": failed},
        "clients_total": c["clients_total"], "evictions": c["evictions"],
        "packets": c["packets"], "batches": c["batches"],
        "broker_private_kb": {"first": timeline[0]["private_kb"], "start": start["private_kb"],
                              "start_t": start["t"], "end": end_mem["private_kb"],
                              "max": max(x["private_kb"] for x in timeline),
                              "trend_mib_per_hour": _slope(warm)},
        "broker_pss_kb": {"start": start["pss_kb"], "end": end_mem["pss_kb"]},
        "broker_anon_kb": {"start": start["anon_kb"], "end": end_mem["anon_kb"]},
        "lost": {"kernel": sum(s.get("kernel_drops", 0) for s in st["sources"]),
                 "broker": c["broker_drops"],
                 "steady_skipped": steady_skipped,
                 "steady_found_missing": {n: o.get("gap_packets") for n, o in outs.items()},
                 "steady_wrong_bytes": {n: o.get("mismatched") for n, o in outs.items()},
                 "churners_skipped": c["client_drops"] - sum(steady_skipped.values())},
        "steady": outs,
        "protocol_errors": c["protocol_errors"], "refused": st["refused"],
        "control": st["control"], "timeline": timeline,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=50_000, help="packets per second")
    ap.add_argument("--churn", type=float, default=0.5, help="seconds between new clients")
    ap.add_argument("--live", action="store_true", help="capture on a veth pair (root)")
    ap.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    if a.live and os.geteuid() != 0:
        print("bench.soak --live needs root (a network namespace)", file=sys.stderr)
        return 1
    started = time.monotonic()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="pktipc-soak-") as tmpdir:
        env = Env(Path(tmpdir))
        try:
            report = soak(env, a)
        finally:
            env.close()
    info["loadavg_after"] = os.getloadavg()
    m = report["broker_private_kb"]
    lost = report["lost"]
    print(f"{report['source']}, {report['minutes']:.1f} min, {report['packets']:,} packets, "
          f"{report['clients_total']} clients attached in all "
          f"({report['churners']['killed']} killed)")
    print(f"broker private memory: {m['start'] / 1024:.1f} MiB at {m['start_t']:.0f} s -> "
          f"{m['end'] / 1024:.1f} MiB at the end (at most {m['max'] / 1024:.1f}; "
          f"trend {m['trend_mib_per_hour']:+.2f} MiB/h)")
    print(f"lost: kernel {lost['kernel']}, broker {lost['broker']}, skipped for the steady "
          f"clients {lost['steady_skipped']} (they found missing "
          f"{lost['steady_found_missing']}), skipped for churners {lost['churners_skipped']:,}")
    save("soak", a.out, started, machine=info, args=vars(a) | {"out": str(a.out)}, **report)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
