"""Recording a live stream to a rolling set of files: `pktipc record` (a
broker capturing, a recorder writing pcapng) against `dumpcap -b
filesize:... -b files:N -w` and `tcpdump -C ... -W N -w`, on one veth pair.

    .venv/bin/python -m bench.record [--quick] [--reps R] [--no-readme]

Same generator (bench/baselines/gen.c, UDP frames of 64 or 1400 bytes over
64 flows), same interface, one recorder at a time, its files in a directory
of /dev/shm or of the disk (through the page cache: what a recorder meets
on a machine with memory to spare). Each recorder gets 32 MiB of kernel
ring: pktipc's broker by default (32 blocks of 1 MiB), dumpcap -B 32,
tcpdump -B 32768; files of 100 MB, 50 kept, so that every frame stays to be
counted. Each climbs a ladder of offered rates, a fresh recorder at each
step given 2 s of frames (--quick: 1 s), until a step at which it did not
write every frame sent; its drop-free rate is the highest step it took
whole. Frames written are counted by capinfos (pktipc's by its own count,
which the tests check against capinfos). CPU: user + system seconds of the
recorder's processes (pktipc: the broker's and the recorder's) from the
first frame sent to the last written, per million frames written, at the
highest step all of them took whole. Needs root (namespaces, CAP_NET_RAW),
gcc, dumpcap, tcpdump, capinfos. Nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pktipc
from bench.live import PY, Bench, proc_cpu, run_alone
from pktipc._client import recording

FILE_MB = 100
FILES = 50
# Offered rates, frames/s, climbed until a recorder loses a frame; 0: as
# fast as the generator goes (about TOP here, alone).
LADDER = {64: [100_000, 200_000, 400_000, 700_000, 0], 1400: [50_000, 100_000, 200_000,
                                                             350_000, 0]}
TOP = {64: 1_400_000, 1400: 800_000}
TOOLS = {"pktipc": "pktipc record", "dumpcap": "dumpcap -b", "tcpdump": "tcpdump -C"}
# Nothing written for this long: the recorder is done. Long enough for a
# recorder the shared machine left without a CPU for a while (and for
# pktipc's count, saved every half second).
QUIET = 1.5


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _wait_line(p: subprocess.Popen[str], needle: str, timeout: float = 20) -> None:
    """Reads the tool's stderr until it says it captures."""
    assert p.stderr is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if needle in line:
            return
        if not line and p.poll() is not None:
            break
    raise RuntimeError(f"{p.args!r}: never said {needle!r}")


# dumpcap says it captures a moment before its socket takes frames: those
# sent meanwhile are neither captured nor counted as dropped. Every recorder
# is given this long after it says it is ready.
READY_GRACE = 1.0


def _settle(size_of: Any, quiet: float, timeout: float = 60) -> None:
    """Waits until what was written stops growing for `quiet` seconds."""
    last, since = -1, time.monotonic()
    deadline = since + timeout
    while time.monotonic() < deadline:
        now = size_of()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.05)


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir())


def _capinfos_count(files: list[Path]) -> int:
    if not files:
        return 0
    out = subprocess.run(["capinfos", "-c", "-M", "-T", "-r", *map(str, files)],
                         capture_output=True, text=True, check=True).stdout
    return sum(int(line.split("\t")[1]) for line in out.splitlines() if line.strip())


class RecordBench:
    def __init__(self, bench: Bench) -> None:
        self.b = bench
        self.n = 0

    def _generate(self, count: int, size: int, rate: float, pids: list[int],
                  written: Any, quiet: float) -> dict[str, Any]:
        """Sends, then waits for the recorder to be done: what was sent, and
        the recorder's CPU seconds from the first frame to the last written."""
        c0 = sum(map(proc_cpu, pids))
        g = self.b.generate(count, size, rate)
        _settle(written, quiet)
        g["cpu_s"] = sum(map(proc_cpu, pids)) - c0
        return g

    def pktipc(self, out: Path, count: int, size: int, rate: float) -> dict[str, Any]:
        self.n += 1
        name = f"recb{os.getpid()}-{self.n}"
        broker = subprocess.Popen(self.b.nsx(PY, "-m", "pktipc", "serve", "--name", name, "-i",
                                             "va"), stderr=subprocess.PIPE, text=True)
        try:
            _wait_line(broker, "capturing on va")
            subprocess.run([PY, "-m", "pktipc", "record", "start", "--server", name, "r", "-w",
                            str(out), "--max-size", f"{FILE_MB * 1000 * 1000}", "--files",
                            str(FILES), "--detach"], check=True, capture_output=True)
            rec_pid = recording.recordings(name)[0]["pid"]
            time.sleep(READY_GRACE)
            # Its count is saved every half second: quiet for longer than that.
            g = self._generate(count, size, rate, [broker.pid, rec_pid],
                               lambda: recording.recordings(name)[0]["packets"], QUIET)
            st = pktipc.broker_stats(name)
            final = recording.stop("r", name)
        finally:
            broker.send_signal(signal.SIGTERM)
            broker.wait(timeout=30)
            if broker.stderr:
                broker.stderr.close()
        rec_drops = next((c.drops for c in st.clients if c.name == "rec.r"), 0)
        # (an interface always reports its kernel's drops: None is a file's)
        kernel_drops = sum(s.kernel_drops or 0 for s in st.sources)
        return {**g, "written": final["packets"],
                "drops": kernel_drops + st.counters.broker_drops + rec_drops}

    def _tool(self, cmd: list[str], ready: str, out: Path, count: int, size: int,
              rate: float) -> tuple[dict[str, Any], str]:
        p = subprocess.Popen(self.b.nsx(*cmd), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        try:
            _wait_line(p, ready)
            time.sleep(READY_GRACE)
            g = self._generate(count, size, rate, [p.pid], lambda: _dir_size(out), QUIET)
        finally:
            p.send_signal(signal.SIGINT)
            err = p.communicate(timeout=60)[1]
        g["written"] = _capinfos_count(sorted(out.iterdir()))
        return g, err

    def dumpcap(self, out: Path, count: int, size: int, rate: float) -> dict[str, Any]:
        g, err = self._tool(["dumpcap", "-i", "va", "-B", "32", "-b",
                             f"filesize:{FILE_MB * 1000}", "-b", f"files:{FILES}", "-w",
                             str(out / "d.pcapng")], "Capturing on", out, count, size, rate)
        m = re.search(r"Packets received/dropped on interface 'va': \d+/(\d+)", err)
        c = re.search(r"Packets captured: (\d+)", err)
        return {**g, "drops": int(m.group(1)) if m else -1,
                "captured": int(c.group(1)) if c else -1}

    def tcpdump(self, out: Path, count: int, size: int, rate: float) -> dict[str, Any]:
        g, err = self._tool(["tcpdump", "-i", "va", "-B", "32768", "-C", str(FILE_MB), "-W",
                             str(FILES), "-w", str(out / "t.pcap"), "-n", "-Z", "root",
                             "--time-stamp-precision", "nano"], "listening on", out, count,
                            size, rate)
        m = re.search(r"(\d+) packets dropped by kernel", err)
        c = re.search(r"(\d+) packets captured", err)
        return {**g, "drops": int(m.group(1)) if m else -1,
                "captured": int(c.group(1)) if c else -1}


def run(bench: Bench, quick: bool, reps: int = 1) -> dict[str, Any]:
    """For each frame size and place, each recorder climbs the ladder of
    offered rates (a fresh recorder at each step, SECONDS of frames) until
    a step at which it did not write every frame sent."""
    rb = RecordBench(bench)
    secs = 1.0 if quick else 2.0
    places = {"/dev/shm": Path("/dev/shm"), "disk": bench.tmp}
    runs = []
    for rep in range(reps):
        order = list(TOOLS) if rep % 2 == 0 else list(TOOLS)[::-1]
        for size, ladder in LADDER.items():
            for place, parent in places.items():
                for tool in order:
                    for rate in ladder:
                        count = int((rate or TOP[size]) * secs)
                        out = Path(tempfile.mkdtemp(prefix="pktipc-rec-", dir=parent))
                        try:
                            r = getattr(rb, tool)(out, count, size, float(rate))
                        finally:
                            shutil.rmtree(out)
                        runs.append({"tool": tool, "size": size, "place": place, "rate": rate,
                                     "rep": rep, **r})
                        print(f"  record {size} B {place} {tool} {rate or 'max'}/s: sent "
                              f"{r['sent']} at {r['sent'] / r['gen_s'] / 1e3:.0f} k/s, written "
                              f"{r['written']}, drops {r['drops']}", flush=True)
                        if r["written"] < r["sent"]:
                            break
    summary = []
    for size, ladder in LADDER.items():
        for place in places:
            # CPU is compared at the highest step every recorder took whole.
            whole = [rate for rate in ladder if all(
                r["written"] == r["sent"] for r in runs
                if (r["size"], r["place"], r["rate"]) == (size, place, rate))
                and {r["tool"] for r in runs if (r["size"], r["place"], r["rate"])
                     == (size, place, rate)} == set(TOOLS)]
            common = whole[-1] if whole else ladder[0]
            for tool in TOOLS:
                xs = [r for r in runs if (r["tool"], r["size"], r["place"]) == (tool, size, place)]
                clean = [r for r in xs if r["written"] == r["sent"]]
                at = [r for r in xs if r["rate"] == common]
                summary.append({
                    "tool": tool, "size": size, "place": place,
                    # the highest rate taken whole, as offered (or reached, at the top)
                    "drop_free_pps": _med([max((r["sent"] / r["gen_s"] for r in clean
                                                if r["rep"] == rep), default=0)
                                           for rep in range(reps)]),
                    "top": any(r["rate"] == 0 for r in clean),
                    "cpu_at": common,
                    "cpu_s_per_M": _med([r["cpu_s"] / (max(r["written"], 1) / 1e6)
                                         for r in at]),
                    "first_loss": min(((r["rate"] or TOP[size], r["written"] / r["sent"],
                                        r["drops"], r["rate"]) for r in xs
                                       if r["written"] < r["sent"]), default=None),
                })
    return {"runs": runs, "summary": summary, "quick": quick, "reps": reps,
            "seconds_per_step": secs}


def _step(rate: int) -> str:
    return f"{rate // 1000} k/s" if rate else "top rate"


def table(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = ["| frames | files in | recorder | drop-free rate, k frames/s | first step with a "
             "loss: written / sent, drops it reports | CPU s / M written (at) |",
             "|---:|---|---|---:|---|---:|"]
    for x in s:
        top = " (the generator's top)" if x["top"] else ""
        loss = (f"{_step(x['first_loss'][3])}: {x['first_loss'][1]:.4f}, "
                f"{x['first_loss'][2]:.0f}" if x["first_loss"] else "none")
        lines.append(f"| {x['size']} B | {x['place']} | {TOOLS[x['tool']]} | "
                     f"{x['drop_free_pps'] / 1e3:.0f}{top} | {loss} | {x['cpu_s_per_M']:.2f} "
                     f"({_step(x['cpu_at'])}) |")
    return "\n".join([*lines, "", *_ratios(s)])


def _ratios(s: list[dict[str, Any]]) -> list[str]:
    """pktipc over dumpcap, for each frame size and place of the files."""
    def get(tool: str, place: str, size: int) -> dict[str, Any]:
        return next(x for x in s if (x["tool"], x["place"], x["size"]) == (tool, place, size))

    out = []
    for size in sorted({x["size"] for x in s}):
        for place in sorted({x["place"] for x in s}):
            p, d = get("pktipc", place, size), get("dumpcap", place, size)
            out.append(f"- {size} B, {place}: pktipc / dumpcap, drop-free rate: "
                       f"**{p['drop_free_pps'] / max(d['drop_free_pps'], 1):.2f}**; "
                       f"CPU per frame: **{p['cpu_s_per_M'] / d['cpu_s_per_M']:.2f}**")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 s per step instead of 2")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--no-readme", action="store_true", help="leave bench/README.md alone")
    a = ap.parse_args(argv)
    return run_alone("record", "recording", lambda bench: run(bench, a.quick, a.reps), table,
                     readme=not a.no_readme)


if __name__ == "__main__":
    sys.exit(main())
