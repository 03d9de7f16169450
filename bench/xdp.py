"""AF_XDP against TPACKET_V3, side by side in one run, on the same veth pair and
the same generator (bench/baselines/gen.c):

    .venv/bin/python -m bench.xdp [--quick] [--reps R] [--rate PPS]

Live, 64- and 1400-byte frames offered alike at one rate every variant keeps
up with (the CPU per packet is then comparable): `serve --xdp` in native
mode and the TPACKET_V3 path (`serve -i`), each with K = 1 and 4 C consumers
(pktipc-count); the raw TPACKET_V3 reader (K = 1) and four independent
TPACKET_V3 sockets (K = 4). Reported separately: the broker's own CPU per
captured packet (its process: user + system), the consumers', and the
kernel's (interrupts, softirqs, ksoftirqd, plus the generator, less what the
generator costs with nobody capturing), per million packets.

Then the file path (a 64-byte capture in /dev/shm, served as fast as it
goes): one fan-out C consumer (no group balances by flow: no hash computed)
against two C consumers of one group balanced by flow (every packet hashed,
as every packet was before hashes were made conditional). The broker's rate
and its CPU per packet.

Writes bench/results/xdp-<date>.json and refreshes the tables between the
`<!-- suite:xdp -->` markers of bench/README.md. Needs root. Measures, never
passes or fails.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import offline
from bench.live import Bench, proc_cpu
from bench.offline import ROOT, machine
from pktipc._tools.synth import write_pcap

PY = sys.executable
CCOUNT = ROOT / "clients" / "c" / "build" / "bin" / "pktipc-count"
README = ROOT / "bench" / "README.md"
XDP = ("--xdp", "--xdp-mode", "native")
VARIANTS = {
    "xdp-1": ("pktipc --xdp (native), 1 C consumer", 1),
    "tpacket-1": ("pktipc TPACKET_V3, 1 C consumer", 1),
    "raw-1": ("raw TPACKET_V3 reader", 1),
    "xdp-4": ("pktipc --xdp (native), 4 C consumers", 4),
    "tpacket-4": ("pktipc TPACKET_V3, 4 C consumers", 4),
    "raw-4": ("4 independent TPACKET_V3 sockets", 4),
}


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run_live(bench: Bench, variant: str, count: int, size: int, rate: float) -> dict[str, Any]:
    kind, k = variant.split("-")[0], int(variant.split("-")[1])
    if kind == "raw":
        r = bench.raw(k, count, size, rate)
        return {**r, "broker_cpu_s": 0.0, "captured": r["sent"]}
    return bench.pktipc(k, count, size, consumer="c", rate=rate,
                        serve=XDP if kind == "xdp" else ())


def live(bench: Bench, quick: bool, reps: int, rate: float,
         only: list[str] | None = None) -> dict[str, Any]:
    counts = {64: 200_000, 1400: 100_000} if quick else {64: 600_000, 1400: 400_000}
    runs = []
    for rep in range(reps):
        for size, count in counts.items():
            plan = ["gen", *(only or VARIANTS)]
            for v in plan if rep % 2 == 0 else plan[::-1]:
                r = bench.generate(count, size, rate) if v == "gen" else \
                    run_live(bench, v, count, size, rate)
                runs.append({"variant": v, "size": size, "rep": rep, **r})
                print(f"  {size} B {v}: sent {r['sent']} in {r['gen_s']:.2f} s, delivered "
                      f"{r.get('delivered')}, kernel drops {r.get('kernel_drops')}", flush=True)
    summary: dict[str, Any] = {}
    for size in counts:
        rs = [r for r in runs if r["size"] == size]
        gen = _med([(r["gen_cpu_s"] + r["kernel_cpu_s"]) / r["sent"]
                    for r in rs if r["variant"] == "gen"])
        per = {}
        for v in only or VARIANTS:
            xs = [r for r in rs if r["variant"] == v]
            per[v] = {
                "offered_pps": _med([r["sent"] / r["gen_s"] for r in xs]),
                "delivered_fraction": _med([min(r["delivered"]) / r["sent"] for r in xs]),
                "kernel_drops": _med([r["kernel_drops"] for r in xs]),
                # per million captured packets
                "broker_cpu_s_per_M": _med([r["broker_cpu_s"] / (r["captured"] / 1e6)
                                            for r in xs]),
                "consumers_cpu_s_per_M": _med([(r["consumer_cpu_s"] - r["broker_cpu_s"])
                                               / (r["captured"] / 1e6) for r in xs]),
                "kernel_cpu_s_per_M": _med([(r["kernel_cpu_s"] + r["gen_cpu_s"]
                                             - gen * r["sent"]) / (r["sent"] / 1e6)
                                            for r in xs]),
                # everything, per million packets delivered to all consumers together
                "cpu_s_per_M_delivered": _med([(r["consumer_cpu_s"] + r["gen_cpu_s"]
                                                + r["kernel_cpu_s"] - gen * r["sent"])
                                               / (sum(r["delivered"]) / 1e6) for r in xs]),
            }
        summary[str(size)] = per
    return {"runs": runs, "summary": summary, "rate": rate}


def serve_file(runtime: Path, pcap: Path, loops: int, group: bool) -> dict[str, Any]:
    """The broker serving `pcap` to one fan-out consumer, or to two of one
    group balanced by flow: its rate and CPU."""
    name = f"xdpbench{os.getpid()}-{time.monotonic_ns()}"
    k = 2 if group else 1
    broker = subprocess.Popen([PY, "-m", "pktipc", "serve", "--name", name, "-r", str(pcap),
                               "--loop", str(loops), "--wait-clients", str(k)],
                              stderr=subprocess.PIPE, text=True)
    while not (runtime / f"{name}.ctl").exists():
        if broker.poll() is not None:
            raise RuntimeError(f"broker: {broker.stderr.read() if broker.stderr else ''}")
        time.sleep(0.01)
    started = proc_cpu(broker.pid)     # its start-up is not serving
    extra = ["-g", "flows"] if group else []
    clients = [subprocess.Popen([str(CCOUNT), "-n", f"c{i}", "-p", "block", "-i", "3600",
                                 *extra, name], stdout=subprocess.PIPE, text=True)
               for i in range(k)]
    outs = [c.communicate(timeout=600)[0] for c in clients]
    _, status, ru = os.wait4(broker.pid, 0)
    broker.returncode = os.waitstatus_to_exitcode(status)
    err = broker.stderr.read() if broker.stderr else ""
    if broker.returncode:
        raise RuntimeError(f"broker: {err}")
    packets = sum(int(o.split("total packets ")[1].split()[0]) for o in outs)
    secs = max(float(o.split(" seconds ")[1].split()[0]) for o in outs)
    return {"packets": packets, "secs": secs, "broker_cpu_s": ru.ru_utime + ru.ru_stime - started}


def files(runtime: Path, quick: bool, reps: int) -> dict[str, Any]:
    pcap = Path("/dev/shm") / f"pktipc-xdpbench-{os.getpid()}.pcap"
    n, loops = (300_000, 3) if quick else (1_000_000, 6)
    try:
        with open(pcap, "wb") as f:
            write_pcap(f, n, sizes=(64,), flows=256)
        runs = []
        for rep in range(reps):
            for group in (False, True) if rep % 2 == 0 else (True, False):
                r = serve_file(runtime, pcap, loops, group)
                runs.append({"group": group, "rep": rep, **r})
                print(f"  file 64 B {'flow group of 2' if group else 'fan-out'}: "
                      f"{r['packets']} in {r['secs']:.2f} s", flush=True)
    finally:
        pcap.unlink(missing_ok=True)
    out = {}
    for group in (False, True):
        xs = [r for r in runs if r["group"] == group]
        out["hashed" if group else "unhashed"] = {
            "pps": _med([r["packets"] / r["secs"] for r in xs]),
            "broker_ns_per_packet": _med([r["broker_cpu_s"] / r["packets"] * 1e9 for r in xs]),
        }
    return {"runs": runs, "summary": out}


def tables(res: dict[str, Any]) -> str:
    lines = []
    lv = res["live"]
    for size, per in lv["summary"].items():
        lines += [f"\n**{size}-byte frames**, offered alike at {lv['rate'] / 1e3:g} k frames/s\n",
                  "| variant | offered Mpps | delivered | kernel drops | broker CPU s / M "
                  "captured | consumers' CPU s / M | kernel CPU s / M | all CPU s / M "
                  "delivered |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for v, s in per.items():
            lines.append(f"| {VARIANTS[v][0]} | {s['offered_pps'] / 1e6:.3f} | "
                         f"{s['delivered_fraction']:.4f} | {s['kernel_drops']:.0f} | "
                         f"{s['broker_cpu_s_per_M']:.3f} | {s['consumers_cpu_s_per_M']:.3f} | "
                         f"{s['kernel_cpu_s_per_M']:.3f} | {s['cpu_s_per_M_delivered']:.3f} |")
        ratios = {
            "--xdp / TPACKET_V3 path, broker CPU per packet (K=1)":
                per["xdp-1"]["broker_cpu_s_per_M"] / per["tpacket-1"]["broker_cpu_s_per_M"],
            "--xdp / TPACKET_V3 path, kernel CPU per packet (K=1)":
                per["xdp-1"]["kernel_cpu_s_per_M"] / per["tpacket-1"]["kernel_cpu_s_per_M"],
            "--xdp K=4 / 4 sockets, all CPU per delivered packet":
                per["xdp-4"]["cpu_s_per_M_delivered"] / per["raw-4"]["cpu_s_per_M_delivered"],
            "TPACKET_V3 path K=4 / 4 sockets, all CPU per delivered packet":
                per["tpacket-4"]["cpu_s_per_M_delivered"]
                / per["raw-4"]["cpu_s_per_M_delivered"],
        }
        lines.append("")
        lines += [f"- {k}: **{v:.2f}**" for k, v in ratios.items()]
    fs = res["files"]["summary"]
    un, ha = fs["unhashed"], fs["hashed"]
    lines += ["\n**The file path**, 64-byte frames from /dev/shm, as fast as it goes\n",
              "| consumers | hash computed | broker Mpps | broker CPU ns / packet |",
              "|---|---|---:|---:|",
              f"| 1 fan-out C consumer | no | {fs['unhashed']['pps'] / 1e6:.2f} | "
              f"{fs['unhashed']['broker_ns_per_packet']:.0f} |",
              f"| 2 C consumers, one group balanced by flow | yes | "
              f"{fs['hashed']['pps'] / 1e6:.2f} | {fs['hashed']['broker_ns_per_packet']:.0f} |",
              "",
              f"- without / with hashing, broker rate: "
              f"**{fs['unhashed']['pps'] / fs['hashed']['pps']:.2f}**; broker CPU per packet: "
              f"**{un['broker_ns_per_packet'] / ha['broker_ns_per_packet']:.2f}**"]
    return "\n".join(lines).lstrip("\n")


def run(bench: Bench, quick: bool, reps: int, rate: float = 150_000) -> dict[str, Any]:
    """Both parts, for bench.suite too."""
    res: dict[str, Any] = {"machine": machine(), "quick": quick, "reps": reps,
                           "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    print("  live", flush=True)
    res["live"] = live(bench, quick, reps, rate)
    print("  files", flush=True)
    res["files"] = files(bench.runtime, quick, reps)
    return res


def table(res: dict[str, Any]) -> str:
    """The README's section: the run, then the tables."""
    m = res["machine"]
    return (f"{m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python {m['python']}; "
            f"commit {m['commit'][:10]}{' (uncommitted changes)' if m['dirty'] else ''}; "
            f"{res['date']}; "
            f"{'--quick' if res['quick'] else 'full run'}, {res['reps']} repetitions\n\n"
            + tables(res))


def refresh_readme(body: str) -> None:
    """Puts the section between the `suite:xdp` markers of bench/README.md."""
    offline.refresh_readme({"xdp": body})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer packets, one repetition")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--rate", type=float, default=150_000,
                    help="the rate every live variant is offered alike (default: 150000/s)")
    ap.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only remake the README's tables from a saved run")
    a = ap.parse_args(argv)
    if a.report:
        refresh_readme(table(json.loads(a.report.read_text())))
        return 0
    if os.geteuid() != 0:
        print("bench.xdp needs root (network namespaces, CAP_NET_ADMIN, CAP_BPF)",
              file=sys.stderr)
        return 1
    reps = a.reps or (1 if a.quick else 3)
    subprocess.run(["make", "-s", "-C", str(ROOT / "clients" / "c"), "examples"], check=True)
    with tempfile.TemporaryDirectory(prefix="pktipc-xdpbench-") as tmpdir:
        bench = Bench(Path(tmpdir))
        try:
            res = run(bench, a.quick, reps, a.rate)
        finally:
            bench.close()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"xdp-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    body = table(res)
    if not a.no_readme:
        refresh_readme(body)
    print(f"\n{body}\n\nresults in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
