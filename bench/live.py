"""Live capture, side by side: pktipc against a raw TPACKET_V3 reader (the
ceiling) and against K independent TPACKET_V3 sockets (what several IDS and
recorders on one tap do today), on a veth pair in a namespace of its own.

    .venv/bin/python -m bench.live [--quick] [--reps R] [--out FILE]

Every scenario sees the same offered load: `bench/baselines/gen.c` sending
COUNT UDP frames of 64 or 1400 bytes, as fast as the kernel takes them, into
the peer of the captured interface. Reported per scenario (medians over
alternating repetitions): frames delivered to each consumer, the offered
rate, drops by stage (kernel, broker, client) and CPU seconds of the whole
machine per million delivered packets: the consumers' processes, the
generator and the kernel's interrupt work, less what the generator alone
costs (the kernel copies a packet into each socket's ring in the sender's
softirq, so that cost is the kernel's, not the reader's).
Then the latency from the kernel's capture timestamp to the client's hands,
at 10,000 frames/s. Needs root (namespaces, CAP_NET_RAW) and gcc.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pktipc
from bench.offline import BASELINES, CLIENT, ROOT, machine, publish
from pktipc._tools.netns import Namespace

PY = sys.executable
CCOUNT = ROOT / "clients" / "c" / "build" / "bin" / "pktipc-count"
HZ = os.sysconf("SC_CLK_TCK")
SETTLE = 0.5        # after the generator: what is still in rings and slabs


def proc_cpu(pid: int) -> float:
    """Seconds a live process has run, all its threads, to the nanosecond
    (the scheduler's count: /proc/PID/stat's user and system times come in
    ticks of 10 ms, too coarse for a broker that runs 50 ms a run)."""
    total = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((t / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue            # a thread that ended meanwhile
    return total / 1e9


def kernel_cpu() -> float:
    """Seconds spent in interrupts and softirqs, wherever they ran: on veth the
    kernel's copies into each socket's ring happen there. That, plus ksoftirqd
    when it takes over, is charged to no consumer process."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    ks = sum(proc_cpu(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()
             and _comm(p).startswith("ksoftirqd"))
    return (f[5] + f[6]) / HZ + ks


def _comm(p: Path) -> str:
    try:
        return (p / "comm").read_text()
    except OSError:
        return ""


class Bench:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        for name in ("gen", "tpacket_read"):
            subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(tmp / name),
                            str(BASELINES / f"{name}.c")], check=True)
        self.ns = Namespace(f"pktipc-bench-{os.getpid()}")
        try:
            self.ns.veth("va", "vb")
        except BaseException:
            self.ns.delete()
            raise
        self.runtime = tmp / "run"
        self.runtime.mkdir()
        os.environ["PKTIPC_RUNTIME_DIR"] = str(self.runtime)

    def nsx(self, *cmd: str) -> list[str]:
        return self.ns.cmd(*cmd)

    def close(self) -> None:
        self.ns.delete()


    def generate(self, count: int, size: int, rate: float = 0,
                 consumers: tuple[int, ...] = ()) -> dict[str, Any]:
        """Runs the generator, then lets the consumers (pids) drain what it
        sent: what was sent, and the CPU seconds it took everyone (the
        consumers', the generator's and the kernel's)."""
        c0, k0 = sum(map(proc_cpu, consumers)), kernel_cpu()
        gen = subprocess.Popen(self.nsx(str(self.tmp / "gen"), "vb", str(count), str(size),
                                        str(rate)), stdout=subprocess.PIPE, text=True)
        assert gen.stdout is not None
        _, sent, _, secs = gen.stdout.read().split()
        _, status, ru = os.wait4(gen.pid, 0)
        gen.returncode = os.waitstatus_to_exitcode(status)
        gen.stdout.close()
        time.sleep(SETTLE)
        consumer_cpu = sum(map(proc_cpu, consumers)) - c0
        return {"sent": int(sent), "gen_s": float(secs), "consumer_cpu_s": consumer_cpu,
                "gen_cpu_s": ru.ru_utime + ru.ru_stime, "kernel_cpu_s": kernel_cpu() - k0}

    def raw(self, k: int, count: int, size: int, rate: float) -> dict[str, Any]:
        """K independent TPACKET_V3 readers (K=1: the ceiling)."""
        procs = []
        for _ in range(k):
            p = subprocess.Popen(self.nsx(str(self.tmp / "tpacket_read"), "va", str(1 << 20),
                                          "32", "10"),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert p.stderr is not None
            assert p.stderr.readline().strip() == "ready"
            procs.append(p)
        g = self.generate(count, size, rate, tuple(p.pid for p in procs))
        consumers = []
        for p in procs:
            p.terminate()
            out, _ = p.communicate(timeout=30)
            f = out.split()
            consumers.append(dict(zip(f[::2], map(int, f[1::2]), strict=True)))
        return {**g, "delivered": [c["packets"] for c in consumers],
                "kernel_drops": sum(c["kernel_drops"] for c in consumers),
                "broker_drops": 0, "client_drops": 0}

    def pktipc(self, k: int, count: int, size: int, *, mode: str = "numpy",
               consumer: str = "python", block_timeout: int = 10,
               rate: float = 0, serve: tuple[str, ...] = ()) -> dict[str, Any]:
        """A broker capturing once (`serve`: more of its arguments, such as
        --xdp), K clients each receiving every packet: Python ones
        (bench/_clientproc.py in `mode`) or C ones (pktipc-count)."""
        name = f"bench{os.getpid()}"
        broker = subprocess.Popen(self.nsx(PY, "-m", "pktipc", "serve", "--name", name,
                                           "-i", "va", "--block-timeout", str(block_timeout),
                                           *serve),
                                  stderr=subprocess.PIPE, text=True)
        sock = self.runtime / f"{name}.ctl"
        while not sock.exists():
            if broker.poll() is not None:
                raise RuntimeError(f"broker: {broker.stderr.read() if broker.stderr else ''}")
            time.sleep(0.02)
        if consumer == "c":
            cmds = [[str(CCOUNT), "-n", f"c{i}", "-i", "3600", name] for i in range(k)]
        else:
            cmds = [[PY, str(CLIENT), name, f"c{i}", mode] for i in range(k)]
        clients = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
                   for cmd in cmds]
        while len(pktipc.broker_stats(name).clients) < k:
            time.sleep(0.02)
        b0 = proc_cpu(broker.pid)
        g = self.generate(count, size, rate, (broker.pid, *(c.pid for c in clients)))
        g["broker_cpu_s"] = proc_cpu(broker.pid) - b0
        st = pktipc.broker_stats(name)
        broker.terminate()              # the clients are told end-of-stream
        outs = [c.communicate(timeout=60)[0] for c in clients]
        results = ([{"packets": int(o.split("total packets ")[1].split()[0])} for o in outs]
                   if consumer == "c" else [json.loads(o) for o in outs])
        broker.wait(timeout=30)
        if broker.stderr:
            broker.stderr.close()
        c = st.counters
        out = {**g, "delivered": [r["packets"] for r in results],
               "kernel_drops": sum(s.kernel_drops or 0 for s in st.sources),
               "broker_drops": c.broker_drops, "client_drops": c.client_drops,
               "batches": c.batches, "captured": c.packets}
        if mode == "latency":
            out.update({key: results[0][key] for key in results[0] if key.startswith("lat_")})
        return out


SCENARIOS: dict[str, tuple[str, Callable[[Bench, int, int, float], dict[str, Any]]]] = {
    "raw-1": ("raw TPACKET_V3 reader, 1 (ceiling)", lambda b, n, s, r: b.raw(1, n, s, r)),
    "pktipc-1": ("pktipc, 1 NumPy client", lambda b, n, s, r: b.pktipc(1, n, s, rate=r)),
    "raw-4": ("4 independent TPACKET_V3 readers", lambda b, n, s, r: b.raw(4, n, s, r)),
    "pktipc-4": ("pktipc, 4 NumPy clients", lambda b, n, s, r: b.pktipc(4, n, s, rate=r)),
    "gen-only": ("the generator alone (CPU baseline)", lambda b, n, s, r: b.generate(n, s, r)),
}


def run_alone(who: str, key: str, run: Callable[[Bench], dict[str, Any]],
              table: Callable[[dict[str, Any]], str], *, readme: bool) -> int:
    """A benchmark that is a command of its own: `run` on a Bench of its
    own (removed after), then its results published (offline.publish) under
    the README's `suite:KEY` markers. Its exit status; 1, saying so, without
    root."""
    if os.geteuid() != 0:
        print(f"bench.{who} needs root (network namespaces, CAP_NET_RAW)", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix=f"pktipc-{who}-") as tmpdir:
        bench = Bench(Path(tmpdir))
        try:
            res = run(bench)
        finally:
            bench.close()
    publish(who, key, res, table(res), readme=readme)
    return 0


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for size, rate in sorted({(r["size"], r["rate"]) for r in runs}):
        rs = [r for r in runs if (r["size"], r["rate"]) == (size, rate)]
        gen = [r for r in rs if r["scenario"] == "gen-only"]
        # What sending costs with nobody capturing: taken off every scenario.
        gen_cpu_per_pkt = _med([(r["gen_cpu_s"] + r["kernel_cpu_s"]) / r["sent"] for r in gen])
        per: dict[str, Any] = {}
        for sc in SCENARIOS:
            xs = [r for r in rs if r["scenario"] == sc]
            if sc == "gen-only" or not xs:
                continue
            per[sc] = {
                "offered_pps": _med([r["sent"] / r["gen_s"] for r in xs]),
                "delivered_per_consumer_pps": _med([min(r["delivered"]) / r["gen_s"]
                                                    for r in xs]),
                "delivered_fraction": _med([min(r["delivered"]) / r["sent"] for r in xs]),
                "kernel_drops": _med([r["kernel_drops"] for r in xs]),
                "broker_drops": _med([r["broker_drops"] for r in xs]),
                "client_drops": _med([r["client_drops"] for r in xs]),
                "cpu_s_per_M": _med([(r["consumer_cpu_s"] + r["gen_cpu_s"] + r["kernel_cpu_s"]
                                      - gen_cpu_per_pkt * r["sent"])
                                     / (sum(r["delivered"]) / 1e6) for r in xs]),
                "consumer_cpu_s_per_M": _med([r["consumer_cpu_s"] / (sum(r["delivered"]) / 1e6)
                                              for r in xs]),
            }
        gen_pps = _med([r["sent"] / r["gen_s"] for r in gen])
        out[f"{size} B, {'max' if not rate else f'{rate:g}/s'}"] = {
            "size": size, "rate": rate, "gen_alone_pps": gen_pps, "scenarios": per}
    return out


def table(summary: dict[str, Any], latency: list[dict[str, Any]]) -> str:
    lines = []
    for s in summary.values():
        sc = s["scenarios"]
        offered = ("as fast as the generator goes" if not s["rate"] else
                   f"offered at {s['rate'] / 1e3:g} k frames/s")
        lines.append(f"\n{s['size']}-byte frames, {offered} (generator alone: "
                     f"{s['gen_alone_pps'] / 1e6:.2f} M frames/s)\n")
        lines.append("| scenario | offered Mpps | delivered per consumer, Mpps | delivered | "
                     "kernel drops | broker drops | client drops | CPU s / M delivered |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
        for key, v in sc.items():
            lines.append(f"| {SCENARIOS[key][0]} | {v['offered_pps'] / 1e6:.3f} | "
                         f"{v['delivered_per_consumer_pps'] / 1e6:.3f} | "
                         f"{v['delivered_fraction']:.4f} | {v['kernel_drops']:.0f} | "
                         f"{v['broker_drops']:.0f} | {v['client_drops']:.0f} | "
                         f"{v['cpu_s_per_M']:.3f} |")
        r = {}
        if "raw-1" in sc and "pktipc-1" in sc:
            r["pktipc-1 / raw-1, delivered"] = (sc["pktipc-1"]["delivered_per_consumer_pps"]
                                                / sc["raw-1"]["delivered_per_consumer_pps"])
        if "pktipc-1" in sc and "pktipc-4" in sc:
            r["pktipc-4 / pktipc-1, delivered per client"] = (
                sc["pktipc-4"]["delivered_per_consumer_pps"]
                / sc["pktipc-1"]["delivered_per_consumer_pps"])
        if "raw-4" in sc and "pktipc-4" in sc:
            r["pktipc-4 / raw-4, CPU per delivered packet"] = (sc["pktipc-4"]["cpu_s_per_M"]
                                                                / sc["raw-4"]["cpu_s_per_M"])
        lines.append("")
        lines += [f"- {k}: **{v:.2f}**" for k, v in r.items()]
    if latency:
        lines.append("\nLatency, kernel capture timestamp to the client's hands (1 NumPy "
                     "client):\n")
        lines.append("| block timeout | rate | p50 ms | p99 ms | p99.9 ms | max ms |")
        lines.append("|---:|---:|---:|---:|---:|---:|")
        for x in latency:
            lines.append(f"| {x['block_timeout']} ms | {x['rate']:.0f}/s | {x['lat_ms_p50']:.3f} "
                         f"| {x['lat_ms_p99']:.3f} | {x['lat_ms_p999']:.3f} | "
                         f"{x['lat_ms_max']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts, one repetition")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--only", help="comma-separated scenarios, of: " + ",".join(SCENARIOS))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--rate", type=float, default=250_000,
                    help="the rate every scenario is offered alike (default: 250000/s)")
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.live needs root (network namespaces, CAP_NET_RAW)", file=sys.stderr)
        return 1
    reps = a.reps or (1 if a.quick else 3)
    counts = {64: 500_000, 1400: 150_000} if a.quick else {64: 2_000_000, 1400: 500_000}
    # Each size as fast as the generator goes, then at one rate every
    # scenario is offered alike (below what the slowest lets it send).
    names = a.only.split(",") if a.only else list(SCENARIOS)
    if "gen-only" not in names:
        names.append("gen-only")
    runs: list[dict[str, Any]] = []
    latency: list[dict[str, Any]] = []
    info = machine()
    with tempfile.TemporaryDirectory(prefix="pktipc-bench-") as tmpdir:
        bench = Bench(Path(tmpdir))
        try:
            for rep in range(reps):
                order = names if rep % 2 == 0 else names[::-1]
                for (size, count), rate in itertools.product(counts.items(), (0, a.rate)):
                    for sc in order:
                        r = SCENARIOS[sc][1](bench, count, size, rate)
                        r.update(scenario=sc, size=size, rate=rate, rep=rep)
                        runs.append(r)
                        print(f"rep {rep} {size} B {rate:g}/s {sc}: sent {r['sent']} in "
                              f"{r['gen_s']:.2f} s, delivered {r.get('delivered')}, "
                              f"kernel drops {r.get('kernel_drops')}", flush=True)
            for timeout in (1, 10):
                n = 10_000 if a.quick else 30_000
                r = bench.pktipc(1, n, 64, mode="latency", block_timeout=timeout, rate=10_000)
                r.update(block_timeout=timeout, rate=10_000)
                latency.append(r)
        finally:
            bench.close()
    summary = summarize(runs)
    print(table(summary, latency))
    out = a.out or ROOT / "bench" / "results" / (
        f"live-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "runs": runs, "latency": latency,
                               "summary": summary}, indent=1))
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
