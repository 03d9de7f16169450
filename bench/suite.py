"""The benchmark suite: pktipc against what users would run instead, side by
side, with plots.

    .venv/bin/python -m bench.suite            # about an hour (make bench)
    .venv/bin/python -m bench.suite --quick    # about 12 minutes

Sections, each run side by side in one invocation (alternating order over
repetitions; medians, with the spread as min-max):

  live      fan-out on a veth pair in a namespace of its own, K = 1, 2, 4, 8
            consumers: pktipc with C consumers, pktipc with Python (NumPy)
            consumers, K independent TPACKET_V3 sockets, and one raw
            TPACKET_V3 reader (the ceiling); 64- and 1400-byte frames from a C
            generator as fast as it goes
  messages  a copy-through-messages broker (msgpack batches over ZeroMQ, in C:
            bench/baselines/msgcopy.c) against pktipc's shared memory, a
            capture file in memory to K = 1 and 4 consumers
  latency   kernel capture timestamp to the client's hands at 1k, 10k and 100k
            frames/s, default and low-latency block timeout
  memory    peak RSS of the broker and of a client, and the segment's size,
            for the default ring and a large one
  suricata  Suricata through pktipc's capture plugin, through its own
            AF_PACKET capture and reading a FIFO, alone and with a second
            analyzer (bench/suricata.py)
  tx        sending out of a veth: pktipc's C and Python clients and pktipc
            replay against a raw TPACKET_V2 TX writer (the ceiling) and
            tcpreplay --topspeed, 64- and 1400-byte frames; ping RTT of
            pktipc-pong against the kernel's own replies (bench/tx.py)
  xdp       serve --xdp against the TPACKET_V3 path and raw TPACKET_V3
            sockets, the broker's CPU apart from the kernel's; the file path
            with and without flow hashes (bench/xdp.py)
  recording pktipc record against dumpcap -b and tcpdump -C, files in
            /dev/shm and on disk (bench/record.py)
  remote    over loopback TCP: a remote client with CURVE and --insecure,
            PCAP-over-IP through pktipc and `tcpdump -w - | nc`, and a local
            client with and without a remote one beside it (bench/remote.py)
  hostile   hostile load (bench/hostile.py): a million hostile control
            messages against two good clients, floods against none, peers
            that never read, stalled drop clients, 1,100 connections against
            a limit of 1,024 files

Writes bench/results/<date>.json, the plots in bench/plots/, and refreshes
the tables between the `<!-- suite:... -->` markers of bench/README.md. Needs
root (namespaces, CAP_NET_RAW), gcc, libpcap, libzmq and msgpack-c headers.
Nothing here passes or fails.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pktipc
from bench import hostile as hostile_bench
from bench import record as record_bench
from bench import remote as remote_bench
from bench import suricata as suricata_bench
from bench import tx as tx_bench
from bench import xdp as xdp_bench
from bench.live import Bench
from bench.offline import BASELINES, CLIENT, ROOT, MemSampler, machine, refresh_readme
from pktipc._tools.synth import write_pcap

PY = sys.executable
CBIN = ROOT / "clients" / "c" / "build" / "bin"
PLOTS = ROOT / "bench" / "plots"


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _spread(xs: list[float]) -> list[float]:
    return [min(xs), max(xs)] if xs else []


def _wait_socket(runtime: Path, name: str, proc: subprocess.Popen[str]) -> None:
    sock = runtime / f"{name}.ctl"
    deadline = time.monotonic() + 20
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"broker {name} did not start")
        time.sleep(0.01)


def _wait_clients(name: str, k: int, broker: subprocess.Popen[str]) -> float:
    """When the k clients were all attached (the broker starts reading then).
    A short stream may be served whole between two looks, the broker gone
    before the second: the time of the last look that saw fewer is taken,
    which undercounts the rate by at most one look."""
    deadline = time.monotonic() + 30
    looked = time.monotonic()       # the start of the last look that saw fewer
    while True:
        start = time.monotonic()
        try:
            if len(pktipc.broker_stats(name).clients) >= k:
                return time.monotonic()
        except pktipc.BrokerNotRunning:
            broker.wait(timeout=10)
            return looked
        looked = start
        if time.monotonic() > deadline:
            raise RuntimeError("clients did not attach")
        time.sleep(0.005)


# --- messages: a capture in memory, pktipc against copying through ZeroMQ --------------


class Offline:
    """A capture file in /dev/shm served to K consumers, by pktipc (C or Python
    consumers) and by the copy-through-messages broker."""

    def __init__(self, tmp: Path, runtime: Path) -> None:
        self.tmp, self.runtime = tmp, runtime
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp / "msgcopy"),
                        str(BASELINES / "msgcopy.c"), "-lpcap", "-lzmq", "-lmsgpackc"],
                       check=True)
        self.n = 0

    def pktipc(self, pcap: Path, loops: int, k: int, consumer: str,
               slabs: int = 64) -> dict[str, Any]:
        self.n += 1
        name = f"suite{os.getpid()}-{self.n}"
        broker = subprocess.Popen([PY, "-m", "pktipc", "serve", "--name", name, "-r", str(pcap),
                                   "--loop", str(loops), "--wait-clients", str(k),
                                   "--slabs", str(slabs)], stderr=subprocess.PIPE, text=True)
        _wait_socket(self.runtime, name, broker)
        mem = MemSampler(broker.pid)
        mem.start()
        if consumer == "c":
            cmds = [[str(CBIN / "pktipc-count"), "-n", f"c{i}", "-p", "block", "-i", "3600",
                     name] for i in range(k)]
        else:
            cmds = [[PY, str(CLIENT), name, f"c{i}", "numpy"] for i in range(k)]
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True, cwd=ROOT) for c in cmds]
        cmem = MemSampler(procs[0].pid)
        cmem.start()
        t0 = _wait_clients(name, k, broker)
        packets, ends = [], []
        for p in procs:
            out = p.communicate(timeout=600)[0]
            ends.append(time.monotonic())
            if consumer == "c":
                packets.append(int(out.split("total packets ")[1].split()[0]))
            else:
                packets.append(json.loads(out)["packets"])
        broker.wait(timeout=60)
        if broker.stderr:
            broker.stderr.close()
        mem.stop()
        cmem.stop()
        def peak(m: MemSampler, *keys: str) -> float:
            return max((sum(s[k] for k in keys) for _, s in m.samples), default=0)
        return {"packets": packets,
                "pps": [n / (t - t0) for n, t in zip(packets, ends, strict=True)],
                "broker_private_kb": peak(mem, "RssAnon", "RssFile"),
                "broker_shared_kb": peak(mem, "RssShmem"),
                "client_private_kb": peak(cmem, "RssAnon", "RssFile"),
                "client_shared_kb": peak(cmem, "RssShmem"),
                "shm_bytes": 4096 + slabs * (1 << 20)}

    def msgcopy(self, pcap: Path, loops: int, k: int) -> dict[str, Any]:
        self.n += 1
        ep = f"ipc://{self.tmp}/msgcopy-{self.n}.ipc"
        srv = subprocess.Popen([str(self.tmp / "msgcopy"), "serve", str(pcap), str(loops),
                                str(k), ep])
        procs = [subprocess.Popen([str(self.tmp / "msgcopy"), "consume", ep],
                                  stdout=subprocess.PIPE, text=True) for _ in range(k)]
        outs = [p.communicate(timeout=600)[0].split() for p in procs]
        srv.wait(timeout=60)
        packets = [int(o[1]) for o in outs]
        return {"packets": packets,
                "pps": [n / float(o[5]) for n, o in zip(packets, outs, strict=True)]}


def messages(off: Offline, quick: bool, reps: int) -> dict[str, Any]:
    files = ({64: (300_000, 3), 1400: (60_000, 3)} if quick else
             {64: (1_000_000, 8), 1400: (200_000, 5)})     # (packets in the file, passes)
    variants: dict[str, Callable[[Path, int, int], dict[str, Any]]] = {
        "pktipc, C consumers": lambda f, lo, k: off.pktipc(f, lo, k, "c"),
        "pktipc, Python (NumPy) consumers": lambda f, lo, k: off.pktipc(f, lo, k, "numpy"),
        "copy through messages (msgcopy.c)": off.msgcopy,
    }
    runs = []
    for size, (count, loops) in files.items():
        pcap = Path(f"/dev/shm/pktipc-suite-{os.getpid()}-{size}.pcap")
        with open(pcap, "wb") as f:
            write_pcap(f, count, sizes=(size,), flows=256)
        try:
            for rep in range(reps):
                order = list(variants) if rep % 2 == 0 else list(variants)[::-1]
                for k in (1, 4):
                    for v in order:
                        r = variants[v](pcap, loops, k)
                        assert all(n == count * loops for n in r["packets"]), (v, r)
                        runs.append({"size": size, "k": k, "variant": v, "rep": rep, **r})
                        print(f"  messages {size} B K={k} {v}: "
                              f"{min(r['pps']) / 1e6:.2f} M/s per consumer", flush=True)
        finally:
            pcap.unlink()
    summary = []
    for size in files:
        for k in (1, 4):
            row: dict[str, Any] = {"size": size, "k": k}
            for v in variants:
                xs = [min(r["pps"]) for r in runs if (r["size"], r["k"], r["variant"]) ==
                      (size, k, v)]
                row[v] = {"pps": _med(xs), "spread": _spread(xs)}
            summary.append(row)
    return {"runs": runs, "summary": summary, "variants": list(variants)}


# --- live fan-out -------------------------------------------------------------------


# Rates at which K = 4 consumers of every kind are offered alike, below what
# the slowest (four sockets, four kernel copies) lets the generator send here.
FIXED_RATES = {64: 300_000, 1400: 200_000}


def live(bench: Bench, quick: bool, reps: int) -> dict[str, Any]:
    ks = (1, 4) if quick else (1, 2, 4, 8)
    counts = {64: 300_000, 1400: 100_000} if quick else {64: 1_000_000, 1400: 300_000}
    variants: dict[str, Callable[[int, int, int, float], dict[str, Any]]] = {
        "pktipc, C consumers": lambda k, n, s, r: bench.pktipc(k, n, s, consumer="c", rate=r),
        "pktipc, Python consumers": lambda k, n, s, r: bench.pktipc(k, n, s, rate=r),
        "K independent TPACKET_V3 sockets": lambda k, n, s, r: bench.raw(k, n, s, r),
    }
    runs = []
    for rep in range(reps):
        for size, count in counts.items():
            # As fast as the generator goes, for every K; then K = 4 at one rate.
            plan = [("raw TPACKET_V3 reader (ceiling)", 1, 0.0), ("generator alone", 0, 0.0)]
            plan += [(v, k, 0.0) for k in ks for v in variants]
            fixed = float(FIXED_RATES[size])
            plan += [("generator alone", 0, fixed), *((v, 4, fixed) for v in variants)]
            for v, k, rate in (plan if rep % 2 == 0 else plan[::-1]):
                if v == "generator alone":
                    r = bench.generate(count, size, rate)
                elif v.startswith("raw"):
                    r = bench.raw(1, count, size, rate)
                else:
                    r = variants[v](k, count, size, rate)
                runs.append({"size": size, "k": k, "variant": v, "rate": rate, "rep": rep, **r})
                print(f"  live {size} B {rate or 'max'} K={k} {v}: sent {r['sent']} in "
                      f"{r['gen_s']:.2f} s, delivered min {min(r.get('delivered', [0]))}",
                      flush=True)
    summary = []
    for size, rate in sorted({(r["size"], r["rate"]) for r in runs}):
        rs = [r for r in runs if (r["size"], r["rate"]) == (size, rate)]
        gen = [r for r in rs if r["variant"] == "generator alone"]
        gen_cpu = _med([(r["gen_cpu_s"] + r["kernel_cpu_s"]) / r["sent"] for r in gen])
        for v in ["raw TPACKET_V3 reader (ceiling)", *variants]:
            for k in sorted({r["k"] for r in rs if r["variant"] == v}):
                xs = [r for r in rs if (r["k"], r["variant"]) == (k, v)]
                pps = [min(r["delivered"]) / r["gen_s"] for r in xs]
                summary.append({
                    "size": size, "rate": rate, "k": k, "variant": v,
                    "offered_pps": _med([r["sent"] / r["gen_s"] for r in xs]),
                    "delivered_pps": _med(pps), "spread": _spread(pps),
                    "delivered_fraction": _med([min(r["delivered"]) / r["sent"] for r in xs]),
                    "kernel_drops": _med([r["kernel_drops"] for r in xs]),
                    "broker_drops": _med([r["broker_drops"] for r in xs]),
                    "client_drops": _med([r["client_drops"] for r in xs]),
                    "cpu_s_per_M": _med([(r["consumer_cpu_s"] + r["gen_cpu_s"]
                                          + r["kernel_cpu_s"] - gen_cpu * r["sent"])
                                         / (sum(r["delivered"]) / 1e6) for r in xs]),
                })
    return {"runs": runs, "summary": summary, "ks": list(ks), "variants": list(variants)}


# --- latency ------------------------------------------------------------------------


def latency(bench: Bench, quick: bool) -> dict[str, Any]:
    rows = []
    secs = 1.0 if quick else 3.0
    for rate in (1_000, 10_000, 100_000):
        for timeout, label in ((10, "default (10 ms blocks)"), (1, "low latency (1 ms)")):
            r = bench.pktipc(1, int(rate * secs), 64, mode="latency", block_timeout=timeout,
                             rate=rate)
            rows.append({"rate": rate, "setting": label, "block_timeout_ms": timeout,
                         **{k: v for k, v in r.items() if k.startswith("lat_")},
                         "delivered": r["delivered"][0], "sent": r["sent"]})
            print(f"  latency {rate}/s {label}: p99 {r['lat_ms_p99']:.2f} ms", flush=True)
    return {"rows": rows}


# --- memory -------------------------------------------------------------------------


def memory(off: Offline, quick: bool) -> dict[str, Any]:
    pcap = Path(f"/dev/shm/pktipc-suite-{os.getpid()}-mem.pcap")
    with open(pcap, "wb") as f:
        write_pcap(f, 100_000 if quick else 500_000, sizes=(64, 1400), flows=256)
    rows = []
    try:
        for slabs, label in ((64, "default ring (64 x 1 MiB)"),
                             (1024, "large ring (1024 x 1 MiB)")):
            for consumer in ("c", "numpy"):
                r = off.pktipc(pcap, 2, 1, consumer, slabs=slabs)
                rows.append({"ring": label, "consumer": consumer, **{
                    k: v for k, v in r.items() if k.endswith("_kb") or k == "shm_bytes"}})
    finally:
        pcap.unlink()
    return {"rows": rows}


# --- report -------------------------------------------------------------------------


def _m(x: float) -> str:
    return f"{x / 1e6:.2f}"


def _cpu_cell(x: float) -> str:
    # Less the generator's own cost, a consumer's share can come out below
    # zero when the run's generator cost less than its median alone: noise.
    return f"{x:.3f}" if x >= 0 else "< 0 (noise)"


def tables(res: dict[str, Any]) -> dict[str, str]:
    out = {}
    lv = res["live"]
    lines = []
    for size, rate in sorted({(s["size"], s["rate"]) for s in lv["summary"]}):
        rows = [s for s in lv["summary"] if (s["size"], s["rate"]) == (size, rate)]
        offered = (f"offered alike at {rate / 1e3:g} k frames/s" if rate else
                   "as fast as the generator goes")
        lines += [f"**{size}-byte frames**, {offered}\n",
                  "| consumers | K | offered Mpps | delivered per consumer, Mpps (spread) | "
                  "delivered | kernel drops | broker drops | client drops | "
                  "CPU s / M delivered |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in rows:
            lines.append(f"| {s['variant']} | {s['k']} | {_m(s['offered_pps'])} | "
                         f"{_m(s['delivered_pps'])} ({'–'.join(map(_m, s['spread']))}) | "
                         f"{s['delivered_fraction']:.4f} | {s['kernel_drops']:.0f} | "
                         f"{s['broker_drops']:.0f} | {s['client_drops']:.0f} | "
                         f"{_cpu_cell(s['cpu_s_per_M'])} |")
        lines.append("")
        lines += [f"- {k}: **{v:.2f}**" for k, v in live_ratios(lv, size, rate).items()]
        lines.append("")
    out["live"] = "\n".join(lines)

    ms = res["messages"]
    lines = ["| frames | K | " + " | ".join(f"{v}, M/s per consumer" for v in ms["variants"])
             + " | pktipc C / messages |", "|---:|---:|" + "---:|" * (len(ms["variants"]) + 1)]
    for row in ms["summary"]:
        cells = [f"{_m(row[v]['pps'])} ({'–'.join(map(_m, row[v]['spread']))})"
                 for v in ms["variants"]]
        ratio = row[ms["variants"][0]]["pps"] / row[ms["variants"][-1]]["pps"]
        lines.append(f"| {row['size']} B | {row['k']} | " + " | ".join(cells)
                     + f" | **{ratio:.1f}×** |")
    out["messages"] = "\n".join(lines)

    lines = ["| offered | setting | p50 ms | p99 ms | p99.9 ms | max ms | delivered |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in res["latency"]["rows"]:
        lines.append(f"| {r['rate']:,}/s | {r['setting']} | {r['lat_ms_p50']:.3f} | "
                     f"{r['lat_ms_p99']:.3f} | {r['lat_ms_p999']:.3f} | {r['lat_ms_max']:.3f} | "
                     f"{r['delivered']}/{r['sent']} |")
    out["latency"] = "\n".join(lines)

    lines = ["| ring | client | segment | broker: private, shared (peak) | "
             "client: private, shared (peak) |", "|---|---|---:|---:|---:|"]
    for r in res["memory"]["rows"]:
        lines.append(f"| {r['ring']} | {'C' if r['consumer'] == 'c' else 'Python'} | "
                     f"{r['shm_bytes'] / 2**20:.0f} MiB | "
                     f"{r['broker_private_kb'] / 1024:.0f} MiB, "
                     f"{r['broker_shared_kb'] / 1024:.0f} MiB | "
                     f"{r['client_private_kb'] / 1024:.0f} MiB, "
                     f"{r['client_shared_kb'] / 1024:.0f} MiB |")
    out["memory"] = "\n".join(lines)
    m = res["machine"]
    out["machine"] = (f"{m['cpus']} CPUs ({m['cpu_model']}), kernel {m['kernel']}, Python "
                      f"{m['python']}, libzmq {m['libzmq']}; commit {m['commit'][:10]}"
                      f"{' (uncommitted changes)' if m['dirty'] else ''}; {res['date']}; "
                      f"{'--quick' if res['quick'] else 'full run'}, {res['reps']} repetitions")
    if "tx" in res:
        out["tx"] = tx_bench.table(res["tx"])
    return out


def live_ratios(lv: dict[str, Any], size: int, rate: float) -> dict[str, float]:
    def get(v: str, k: int) -> dict[str, Any] | None:
        return next((s for s in lv["summary"] if (s["size"], s["rate"], s["variant"], s["k"])
                     == (size, rate, v, k)), None)
    ceiling = get("raw TPACKET_V3 reader (ceiling)", 1)
    r: dict[str, float] = {}
    c1, c4 = get("pktipc, C consumers", 1), get("pktipc, C consumers", 4)
    k4 = get("K independent TPACKET_V3 sockets", 4)
    if ceiling and c1:
        r["pktipc (C) K=1 / raw reader, delivered"] = (c1["delivered_pps"]
                                                       / ceiling["delivered_pps"])
    if c1 and c4:
        r["pktipc (C) K=4 / K=1, delivered per consumer"] = (c4["delivered_pps"]
                                                              / c1["delivered_pps"])
    if c4 and k4:
        r["pktipc (C) K=4 / 4 sockets, CPU per delivered packet"] = (c4["cpu_s_per_M"]
                                                                     / k4["cpu_s_per_M"])
        r["pktipc (C) K=4 / 4 sockets, delivered per consumer"] = (c4["delivered_pps"]
                                                                   / k4["delivered_pps"])
    return r


def plots(res: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    made = []
    lv = res["live"]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    top = [s for s in lv["summary"] if not s["rate"]]
    for col, size in enumerate(sorted({s["size"] for s in top})):
        ceiling = next(s for s in top if s["size"] == size and s["variant"].startswith("raw"))
        for v in lv["variants"]:
            rows = [s for s in top if (s["size"], s["variant"]) == (size, v)]
            ks = [s["k"] for s in rows]
            axes[0][col].plot(ks, [s["delivered_pps"] / 1e6 for s in rows], marker="o", label=v)
            axes[1][col].plot(ks, [s["cpu_s_per_M"] for s in rows], marker="o", label=v)
        axes[0][col].axhline(ceiling["delivered_pps"] / 1e6, ls="--", c="gray",
                             label="raw reader, K=1 (ceiling)")
        axes[0][col].set_title(f"{size}-byte frames: delivered per consumer")
        axes[0][col].set_ylabel("M packets/s")
        axes[1][col].set_title(f"{size}-byte frames: CPU per delivered packet")
        axes[1][col].set_ylabel("CPU s / M packets")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("consumers (K)")
            ax.set_xticks(lv["ks"])
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOTS / "live.png", dpi=90)
    plt.close(fig)
    made.append("live.png")

    ms = res["messages"]
    fig, ax = plt.subplots(figsize=(9, 4))
    groups = [f"{r['size']} B, K={r['k']}" for r in ms["summary"]]
    width = 0.8 / len(ms["variants"])
    for i, v in enumerate(ms["variants"]):
        ax.bar([x + i * width for x in range(len(groups))],
               [r[v]["pps"] / 1e6 for r in ms["summary"]], width, label=v)
    ax.set_xticks([x + width * (len(ms["variants"]) - 1) / 2 for x in range(len(groups))],
                  groups)
    ax.set_ylabel("M packets/s per consumer")
    ax.set_title("A capture in memory to K consumers: shared memory against messages")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOTS / "messages.png", dpi=90)
    plt.close(fig)
    made.append("messages.png")

    rows = res["latency"]["rows"]
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['rate'] // 1000}k/s\n{r['block_timeout_ms']} ms" for r in rows]
    for key, name in (("lat_ms_p50", "p50"), ("lat_ms_p99", "p99"), ("lat_ms_p999", "p99.9")):
        ax.plot(labels, [r[key] for r in rows], marker="o", label=name)
    ax.axhline(2.0, ls="--", c="gray", label="2 ms")
    ax.set_ylabel("ms, capture to client")
    ax.set_yscale("log")
    ax.set_title("Latency by offered rate and block timeout")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(PLOTS / "latency.png", dpi=90)
    plt.close(fig)
    made.append("latency.png")
    return made


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="under 2 minutes: fewer K, packets, "
                    "repetitions")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="only remake the tables, plots and README from a saved run")
    a = ap.parse_args(argv)
    res: dict[str, Any]
    if a.report:
        res = json.loads(a.report.read_text())
        sections = tables(res)
        if "hostile" in res:
            sections["hostile"] = hostile_bench.tables(res["hostile"])
        refresh_readme(sections)
        if "xdp" in res:
            xdp_bench.refresh_readme(xdp_bench.table(res["xdp"]))
        plots(res)
        return 0
    if os.geteuid() != 0:
        print("bench.suite needs root (network namespaces, CAP_NET_RAW)", file=sys.stderr)
        return 1
    reps = a.reps or (1 if a.quick else 3)
    subprocess.run(["make", "-s", "-C", str(ROOT / "clients" / "c"), "examples"], check=True)
    subprocess.run(["make", "-s", "-C", str(ROOT / "clients" / "suricata")], check=True)
    started = time.monotonic()
    res = {"machine": machine(), "quick": a.quick, "reps": reps,
           "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}
    with tempfile.TemporaryDirectory(prefix="pktipc-suite-") as tmpdir:
        tmp = Path(tmpdir)
        bench = Bench(tmp)
        try:
            off = Offline(tmp, bench.runtime)
            print("live fan-out", flush=True)
            res["live"] = live(bench, a.quick, reps)
            print("messages", flush=True)
            res["messages"] = messages(off, a.quick, reps)
            print("latency", flush=True)
            res["latency"] = latency(bench, a.quick)
            print("memory", flush=True)
            res["memory"] = memory(off, a.quick)
            print("suricata", flush=True)
            res["suricata"] = suricata_bench.run(bench, a.quick)
            print("tx", flush=True)
            txb = tx_bench.TxBench(tmp, bench.runtime)
            try:
                res["tx"] = tx_bench.run(txb, a.quick, reps)
            finally:
                txb.close()
            print("recording", flush=True)
            res["recording"] = record_bench.run(bench, a.quick)
            print("remote", flush=True)
            res["remote"] = remote_bench.run(a.quick, reps)
            print("AF_XDP", flush=True)
            res["xdp"] = xdp_bench.run(bench, a.quick, reps)
        finally:
            bench.close()
    print("hostile", flush=True)
    res["hostile"] = hostile_bench.run(a.quick)
    res["seconds"] = time.monotonic() - started
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = ROOT / "bench" / "results" / f"{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    sections = tables(res)
    if "suricata" in res:
        sections["suricata"] = suricata_bench.table(res["suricata"])
    if "hostile" in res:
        sections["hostile"] = hostile_bench.tables(res["hostile"])
    if "recording" in res:
        sections["recording"] = record_bench.table(res["recording"])
    if "remote" in res:
        sections["remote"] = remote_bench.table(res["remote"])
    made = plots(res)
    if not a.no_readme:
        refresh_readme(sections)
        if "xdp" in res:
            xdp_bench.refresh_readme(xdp_bench.table(res["xdp"]))
    for key in ("live", "messages", "latency", "memory", "suricata", "recording", "tx",
                "remote", "hostile"):
        if key not in sections:
            continue
        print(f"\n## {key}\n\n{sections[key]}")
    if "xdp" in res:
        print(f"\n## AF_XDP\n\n{xdp_bench.table(res['xdp'])}")
    print(f"\n{res['seconds']:.0f} s; results in {out}; plots {', '.join(made)} in {PLOTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
