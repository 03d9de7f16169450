"""Offline benchmark: a capture file served to Python clients, against libpcap.

    .venv/bin/python -m bench.offline [--quick] [--packets N] [--big-packets N]
                                      [--loops L] [--reps R] [--only a,b,...] [--profile]

Generates synthetic captures in /dev/shm (64-byte frames, and 1400-byte ones),
then runs, alternating the order at every repetition (each run reads the file
L times, the fast scenarios 4 L times, so that none lasts only an instant):

  a   broker -> 1 client, packet objects (sums p.caplen, reads p.ts_ns)
  b   broker -> 4 such clients at once (each gets every packet)
  c   broker -> 1 client, NumPy descriptors only (descriptors["caplen"].sum())
  b2  broker -> 4 NumPy clients at once
  d   libpcap in one process, no broker (bench/baselines/pcap_read.c): the ceiling
  d2  tcpdump -r FILE -w /dev/null
  d3  libpcap + one copy into a 64 x 1 MiB ring, in C (bench/baselines/pcap_copy.c):
      the broker's ingest without Python, messages or clients

Every client is its own process and gets every packet (the broker waits for
all K with --wait-clients K; file replay is lossless). Prints a table of
medians and writes every run to bench/results/offline-<date>.json. A
benchmark, not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
CLIENT = BENCH / "_clientproc.py"
BASELINES = BENCH / "baselines"
PY = sys.executable
RUN_TIMEOUT = 300.0


@dataclass(frozen=True)
class Scenario:
    key: str
    what: str
    clients: int = 0          # 0: a baseline, no broker
    mode: str = ""            # client mode, or the baseline's name
    weight: int = 1           # passes over the file, times --loops: fast ones run longer


SCENARIOS = [
    Scenario("a", "broker -> 1 client, packet objects", 1, "objects"),
    Scenario("b", "broker -> 4 clients, packet objects", 4, "objects"),
    Scenario("c", "broker -> 1 client, NumPy descriptors", 1, "numpy", 4),
    Scenario("b2", "broker -> 4 clients, NumPy descriptors", 4, "numpy", 4),
    Scenario("d", "libpcap pcap_next_ex, one process (ceiling)", 0, "pcap_read", 4),
    Scenario("d2", "tcpdump -r FILE -w /dev/null", 0, "tcpdump", 4),
    Scenario("d3", "libpcap + copy into a 64 MiB ring, C, no IPC", 0, "pcap_copy", 4),
]


# --- processes -----------------------------------------------------------------


class Procs:
    """Every process this benchmark starts, so that each is ended by its pid."""

    def __init__(self) -> None:
        self.live: dict[int, subprocess.Popen[bytes]] = {}
        self.brokers: list[str] = []      # names, to remove what a killed one leaves

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, **kw)
        self.live[p.pid] = p
        return p

    def reap(self, p: subprocess.Popen[bytes]) -> tuple[int, Any]:
        """Waits for `p`, returning its exit code and its own rusage (wait4)."""
        while True:
            try:
                _, status, ru = os.wait4(p.pid, 0)
                break
            except ChildProcessError:   # already reaped (by Popen after a kill)
                return p.wait(), None
            except InterruptedError:
                continue
        p.returncode = os.waitstatus_to_exitcode(status)
        self.live.pop(p.pid, None)
        return p.returncode, ru

    def kill(self, p: subprocess.Popen[bytes]) -> None:
        if p.pid in self.live and p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)

    def kill_all(self) -> None:
        """Ends every process still running, and removes the segments a
        killed broker of ours could not."""
        for p in list(self.live.values()):
            self.kill(p)
            with contextlib.suppress(Exception):
                p.wait(5)
            self.live.pop(p.pid, None)
        from pktipc._paths import segment_prefix

        for name in self.brokers:
            for seg in Path("/dev/shm").glob(segment_prefix(name) + "*"):
                seg.unlink(missing_ok=True)


def save(bench: str, out: Path | None, started: float, **record: Any) -> None:
    """Writes one benchmark's record to `out`, by default
    bench/results/<bench>-<date>.json."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = out or BENCH / "results" / f"{bench}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bench": bench, "date": stamp, "argv": sys.argv[1:], **record,
                               "elapsed_s": round(time.monotonic() - started, 1)}, indent=1))
    print(f"\nwrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out} "
          f"({time.monotonic() - started:.0f} s)")


README = BENCH / "README.md"


def refresh_readme(sections: dict[str, str]) -> None:
    """Puts each body between the `suite:KEY` markers of bench/README.md."""
    import re

    text = README.read_text()
    for key, body in sections.items():
        pattern = re.compile(rf"(<!-- suite:{key} -->\n).*?(\n<!-- /suite:{key} -->)", re.S)
        if pattern.search(text):
            # (a function, so that backslashes in the body are not read as escapes)
            def between(m: re.Match[str], body: str = body) -> str:
                return m.group(1) + body + m.group(2)

            text = pattern.sub(between, text)
    README.write_text(text)


def publish(bench: str, key: str, res: dict[str, Any], body: str, *, readme: bool) -> None:
    """The end of a benchmark that is a command of its own: its results (with
    the machine) in bench/results/<bench>-<UTC time>.json, its table between
    the README's `suite:KEY` markers (unless not `readme`), and on stdout."""
    res["machine"] = machine()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = BENCH / "results" / f"{bench}-{stamp}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if readme:
        refresh_readme({key: body})
    print(f"\n{body}\n\nresults in {out}")


class Watchdog:
    """Kills the given processes if they outlive `timeout`."""

    def __init__(self, procs: Procs, ps: list[subprocess.Popen[bytes]], timeout: float) -> None:
        self.fired = False

        def fire() -> None:
            self.fired = True
            for p in ps:
                procs.kill(p)
        self._t = threading.Timer(timeout, fire)
        self._t.daemon = True
        self._t.start()

    def cancel(self) -> None:
        self._t.cancel()


def _cpu(ru: Any) -> float:
    return (ru.ru_utime + ru.ru_stime) if ru is not None else float("nan")


# --- broker memory -----------------------------------------------------------------

_STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


_TICK = os.sysconf("SC_CLK_TCK")


def _status(pid: int) -> dict[str, float] | None:
    """Memory (kB) from /proc/<pid>/status, CPU seconds ("cpu") from its stat."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    out: dict[str, float] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k in _STATUS_KEYS:
            out[k] = int(v.split()[0])
    fields = stat[stat.rindex(")") + 2:].split()
    out["cpu"] = (int(fields[11]) + int(fields[12])) / _TICK    # utime, stime
    return out if len(out) == len(_STATUS_KEYS) + 1 else None


class MemSampler(threading.Thread):
    """Samples /proc/<pid>/status every `every` seconds until the process ends."""

    def __init__(self, pid: int, every: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.every = every
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            s = _status(self.pid)
            if s is None:
                return
            self.samples.append((time.monotonic(), s))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _memory(samples: list[tuple[float, dict[str, float]]], t_go: float,
            t_end: float) -> dict[str, Any]:
    """Broker memory, kB: peaks, and private memory early vs late in the stream."""
    if not samples:
        return {}
    during = [s for t, s in samples if t_go <= t <= t_end] or [s for _, s in samples]
    private = [s["RssAnon"] + s["RssFile"] for s in during]
    return {
        "vmhwm_kb": max(s["VmHWM"] for _, s in samples),
        "rss_peak_kb": max(s["VmRSS"] for _, s in samples),
        "rss_shmem_peak_kb": max(s["RssShmem"] for _, s in samples),
        "rss_anon_peak_kb": max(s["RssAnon"] for _, s in samples),
        "private_peak_kb": max(s["RssAnon"] + s["RssFile"] for _, s in samples),
        "private_first_kb": private[0],
        "private_last_kb": private[-1],
        "samples": len(samples),
    }


# --- runs --------------------------------------------------------------------------


def python_client(server: str, name: str, mode: str) -> list[str]:
    return [PY, str(CLIENT), server, name, mode]


@dataclass
class Ctx:
    procs: Procs
    tmp: Path
    env: dict[str, str]
    bin: Path                 # where the C baselines were built
    expected: dict[str, dict[str, int]] = field(default_factory=dict)   # file -> counts
    loops: int = 1
    seq: int = 0
    client_cmd: Callable[[str, str, str], list[str]] = python_client   # (server, name, mode)


def _wait_for(path: Path, broker: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if broker.poll() is not None:
            raise RuntimeError(f"broker exited early with status {broker.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"broker did not create {path} within {timeout:g} s")
        time.sleep(0.005)


def run_broker(ctx: Ctx, sc: Scenario, pcap: Path, *, profile: Path | None = None,
               passes: int | None = None) -> dict[str, Any]:
    ctx.seq += 1
    name = f"bench{os.getpid()}-{ctx.seq}"
    rundir = Path(ctx.env["PKTIPC_RUNTIME_DIR"])
    passes = passes or ctx.loops * sc.weight
    serve = ["-m", "pktipc", "serve", "--name", name, "-r", str(pcap),
             "--wait-clients", str(sc.clients), "--loop", str(passes)]
    prof = ["-m", "cProfile", "-o", str(profile / f"broker-{sc.key}.prof")] if profile else []
    ctx.procs.brokers.append(name)
    errlog = ctx.tmp / f"{name}.broker.err"
    with open(errlog, "wb") as err:
        broker = ctx.procs.start([PY, *prof, *serve], env=ctx.env, stdout=subprocess.DEVNULL,
                                 stderr=err, cwd=ROOT)
    clients: list[subprocess.Popen[bytes]] = []
    dog = Watchdog(ctx.procs, [broker], RUN_TIMEOUT)
    sampler = MemSampler(broker.pid)
    try:
        _wait_for(rundir / f"{name}.ctl", broker)
        sampler.start()
        segs = list(Path("/dev/shm").glob(f"pktipc.{name}.*"))
        shm_size = segs[0].stat().st_size if segs else None
        cenv = dict(ctx.env)
        modes = sc.mode.split("+")       # "a+b": client 0 runs a, client 1 b, ...
        for i in range(sc.clients):
            if profile:
                cenv["PKTIPC_BENCH_PROFILE"] = str(profile / f"client-{sc.key}-{i}.prof")
            clients.append(ctx.procs.start(ctx.client_cmd(name, f"c{i}", modes[i % len(modes)]),
                                           env=cenv, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, cwd=ROOT))
        dog.cancel()
        dog = Watchdog(ctx.procs, [broker, *clients], RUN_TIMEOUT)
        results, cpu_clients = [], 0.0
        for c in clients:
            rc, ru = ctx.procs.reap(c)
            out, errtext = c.communicate()
            if rc != 0:
                raise RuntimeError(f"client exited {rc}: {errtext.decode(errors='replace')}")
            r = json.loads(out.decode().strip().splitlines()[-1])
            r["cpu_s"] = _cpu(ru)
            cpu_clients += r["cpu_s"]
            results.append(r)
        brc, bru = ctx.procs.reap(broker)
    finally:
        dog.cancel()
        for p in (*clients, broker):
            ctx.procs.kill(p)
        sampler.stop()
    if dog.fired:
        raise RuntimeError(f"{sc.key}: timed out after {RUN_TIMEOUT:g} s")
    if brc != 0:
        raise RuntimeError(f"broker exited {brc}: {errlog.read_text()}")
    errlog.unlink(missing_ok=True)
    exp = ctx.expected[str(pcap)]
    t_go = max(r["t_attached"] for r in results)    # the broker reads once all are in
    t_end = max(r["t_end"] for r in results)
    for r in results:
        r["pps"] = r["packets"] / (r["t_end"] - t_go)
        r["complete"] = (r["packets"] == exp["packets"] * passes
                         and r["caplen_sum"] == exp["caplen_sum"] * passes and not r["gaps"])
    delivered = sum(r["packets"] for r in results)
    cpu_broker = _cpu(bru)
    # CPU while streaming: the broker's since its last sample before t_go (a
    # 20 ms sampling step, 10 ms ticks), the clients' since they attached.
    before = [s["cpu"] for t, s in sampler.samples if t <= t_go]
    cpu_broker_stream = cpu_broker - (before[-1] if before else 0.0)
    cpu_stream = cpu_broker_stream + sum(r["cpu_stream_s"] for r in results)
    return {
        "scenario": sc.key, "clients": results, "passes": passes,
        "packets_per_client": exp["packets"] * passes,
        "pps_per_client": [r["pps"] for r in results],
        "pps_mean": statistics.fmean(r["pps"] for r in results),
        "pps_min": min(r["pps"] for r in results),
        "wall_s": t_end - t_go,
        "complete": all(r["complete"] for r in results),
        "cpu_broker_s": cpu_broker, "cpu_clients_s": cpu_clients,
        "cpu_total_s": cpu_broker + cpu_clients,
        "cpu_broker_stream_s": cpu_broker_stream, "cpu_stream_s": cpu_stream,
        "cpu_s_per_mpkt": cpu_stream / (delivered / 1e6),
        "broker_maxrss_kb": bru.ru_maxrss if bru is not None else None,
        "shm_bytes": shm_size,
        "memory": _memory(sampler.samples, t_go, t_end),
    }


def run_baseline(ctx: Ctx, sc: Scenario, pcap: Path) -> dict[str, Any]:
    exp = ctx.expected[str(pcap)]
    passes = ctx.loops * sc.weight
    if sc.mode in ("pcap_read", "pcap_copy"):
        argv = [str(ctx.bin / sc.mode), str(pcap), str(passes)]
    else:   # -V: a file naming the files to read, one after another
        listing = ctx.tmp / f"{pcap.name}.x{passes}"
        listing.write_text(f"{pcap}\n" * passes)
        argv = ["tcpdump", "-q", "-V", str(listing), "-w", "/dev/null"]
    t0 = time.monotonic()
    p = ctx.procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dog = Watchdog(ctx.procs, [p], RUN_TIMEOUT)
    try:
        rc, ru = ctx.procs.reap(p)
    finally:
        dog.cancel()
    wall = time.monotonic() - t0
    out, err = p.communicate()
    if rc != 0:
        raise RuntimeError(f"{argv[0]} exited {rc}: {err.decode(errors='replace')}")
    if sc.mode != "tcpdump":
        r = json.loads(out)
        secs, packets = r["seconds"], r["packets"]
        complete = (packets == exp["packets"] * passes
                    and r["caplen_sum"] == exp["caplen_sum"] * passes)
    else:   # tcpdump: whole process, start-up included (a few ms)
        secs, packets, complete = wall, exp["packets"] * passes, True
    return {"scenario": sc.key, "passes": passes, "packets_per_client": packets,
            "pps_per_client": [packets / secs], "pps_mean": packets / secs,
            "pps_min": packets / secs, "wall_s": secs, "complete": complete,
            "cpu_total_s": _cpu(ru), "cpu_s_per_mpkt": _cpu(ru) / (packets / 1e6)}


def run(ctx: Ctx, sc: Scenario, pcap: Path) -> dict[str, Any]:
    return run_broker(ctx, sc, pcap) if sc.clients else run_baseline(ctx, sc, pcap)


# --- setup -------------------------------------------------------------------------


def generate(path: Path, packets: int, size: int) -> float:
    from pktipc._tools.synth import write_pcap

    t0 = time.monotonic()
    with open(path, "wb", buffering=1 << 20) as f:
        write_pcap(f, packets, sizes=(size,), flows=256, rate_pps=1e6)
    return time.monotonic() - t0


def compile_baselines(tmp: Path) -> Path:
    for name in ("pcap_read", "pcap_copy"):
        subprocess.run(["gcc", "-O2", "-Wall", "-Wextra", "-o", str(tmp / name),
                        str(BASELINES / f"{name}.c"), "-lpcap"], check=True)
    return tmp


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import numpy
    import zmq

    def git(*a: str) -> str:
        r = subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True)
        return r.stdout.strip()

    # The package is being worked on: name the exact sources measured.
    tree = hashlib.sha256()
    for f in sorted([*ROOT.glob("pktipc/**/*.py"), *ROOT.glob("pktipc/**/*.[ch]"),
                     *ROOT.glob("shm/*.[ch]")]):
        tree.update(f.name.encode() + b"\0" + f.read_bytes())
    return {
        "cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
        "python": platform.python_version(), "numpy": numpy.__version__,
        "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(),
        "mem_total_kb": int(Path("/proc/meminfo").read_text().split()[1]),
        "loadavg_before": os.getloadavg(),
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "pktipc", "shm")),
        "sources_sha256": tree.hexdigest()[:16],
    }


# --- summary -----------------------------------------------------------------------


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(runs: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Medians over repetitions; ratios are medians of per-repetition ratios
    (runs of one repetition are neighbours in time, so they share the noise)."""
    out: dict[str, Any] = {}
    for v in variants:
        by: dict[str, list[dict[str, Any]]] = {}
        for r in runs:
            if r["variant"] == v:
                by.setdefault(r["scenario"], []).append(r)
        s: dict[str, Any] = {}
        for key, rs in by.items():
            mem = [r["memory"] for r in rs if r.get("memory")]
            s[key] = {
                "reps": len(rs),
                "pps_mean": _med([r["pps_mean"] for r in rs]),
                "pps_min": _med([r["pps_min"] for r in rs]),
                "pps_lo": min(r["pps_mean"] for r in rs),
                "pps_hi": max(r["pps_mean"] for r in rs),
                "cpu_s_per_mpkt": _med([r["cpu_s_per_mpkt"] for r in rs]),
                "packets_per_client": rs[0]["packets_per_client"],
                "complete": all(r["complete"] for r in rs),
            }
            if mem:
                s[key]["broker_vmhwm_kb"] = max(m["vmhwm_kb"] for m in mem)
                s[key]["broker_private_peak_kb"] = max(m["private_peak_kb"] for m in mem)
                s[key]["broker_private_first_kb"] = _med([m["private_first_kb"] for m in mem])
                s[key]["broker_private_last_kb"] = _med([m["private_last_kb"] for m in mem])
                s[key]["broker_rss_shmem_peak_kb"] = max(m["rss_shmem_peak_kb"] for m in mem)
                s[key]["shm_bytes"] = rs[0]["shm_bytes"]
                s[key]["cpu_broker_stream_s"] = _med([r["cpu_broker_stream_s"] for r in rs])
                s[key]["cpu_stream_s"] = _med([r["cpu_stream_s"] for r in rs])
                s[key]["wall_s"] = _med([r["wall_s"] for r in rs])

        def ratio(num: str, den: str, field: str = "pps_mean", v: str = v) -> float | None:
            nums = {r["rep"]: r[field] for r in runs
                    if r["variant"] == v and r["scenario"] == num}
            dens = {r["rep"]: r["pps_mean"] for r in runs
                    if r["variant"] == v and r["scenario"] == den}
            xs = [nums[k] / dens[k] for k in nums if k in dens]
            return _med(xs) if xs else None

        s["ratios"] = {
            "b/a per-client mean": ratio("b", "a"),
            "b/a slowest client": ratio("b", "a", "pps_min"),
            "b2/c per-client mean": ratio("b2", "c"),
            "c/d numpy vs libpcap": ratio("c", "d"),
            "c/d3 numpy vs C copy": ratio("c", "d3"),
            "a/d objects vs libpcap": ratio("a", "d"),
        }
        out[v] = s
    return out


def _mpps(x: float | None) -> str:
    return "-" if x is None or x != x else f"{x / 1e6:.2f}"


def table(summary: dict[str, Any], files: dict[str, dict[str, Any]]) -> str:
    lines = []
    for v, s in summary.items():
        f = files[v]
        reps = next(iter(s.values()))["reps"]
        lines.append(f"\n{v}-byte frames: file of {f['packets']:,} packets "
                     f"({f['bytes'] / 1e6:.0f} MB, /dev/shm), {reps} repetitions, medians")
        lines.append(f"{'':3} {'':44} {'Mpkt':>5} {'Mpkt/s per client':>25} {'CPU s':>6}"
                     f"  {'broker memory, MiB':>27}")
        lines.append(f"{'':3} {'scenario':44} {'each':>5} {'median':>6} {'range':>11} "
                     f"{'min':>6} {'/Mpkt':>6}  {'VmHWM':>5} {'private':>15} {'shm':>4}")
        for sc in SCENARIOS:
            r = s.get(sc.key)
            if r is None:
                continue
            rng = f"{r['pps_lo'] / 1e6:.2f}-{r['pps_hi'] / 1e6:.2f}"
            mem = ""
            if "broker_vmhwm_kb" in r:
                private = (f"{r['broker_private_peak_kb'] / 1024:.0f} "
                           f"({r['broker_private_first_kb'] / 1024:.0f}->"
                           f"{r['broker_private_last_kb'] / 1024:.0f})")
                mem = (f"{r['broker_vmhwm_kb'] / 1024:5.0f} {private:>15} "
                       f"{r['shm_bytes'] / 2**20:4.0f}")
            flag = "" if r["complete"] else "  INCOMPLETE"
            lines.append(f"{sc.key:3} {sc.what:44} {r['packets_per_client'] / 1e6:5.1f} "
                         f"{_mpps(r['pps_mean']):>6} {rng:>11} {_mpps(r['pps_min']):>6} "
                         f"{r['cpu_s_per_mpkt']:6.3f}  {mem}{flag}")
        for name, x in s["ratios"].items():
            if x is not None:
                lines.append(f"    ratio {name:28} {x:5.2f}")
    lines.append("\nMpkt/s: packets each client received / seconds from the start of the "
                 "stream to its end.\nCPU s/Mpkt: CPU seconds of every process while "
                 "streaming, per million packets delivered\n(to all clients together). "
                 "private: RssAnon+RssFile, peak (start -> end of the stream);\n"
                 "VmHWM includes the shared segment's pages the broker touched (shm: "
                 "segment size).")
    return "\n".join(lines)


def print_profiles(profile: Path) -> None:
    import pstats

    for prof in sorted(profile.glob("*.prof")):
        print(f"\n--- {prof.name} (top 14 by own time)")
        pstats.Stats(str(prof)).sort_stats("tottime").print_stats(14)


# --- main --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.offline", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small files, 3 repetitions (< 1 min)")
    ap.add_argument("--packets", type=int,
                    help="64-byte packets (default 2,000,000; quick 300,000)")
    ap.add_argument("--big-packets", type=int,
                    help="1400-byte packets, 0 to skip (default 500,000; quick 100,000)")
    ap.add_argument("--loops", type=int,
                    help="passes over the file for packet-object clients; NumPy clients "
                         "and baselines make 4 times as many (default 3; quick 2)")
    ap.add_argument("--reps", type=int, help="repetitions (default 5; quick 3)")
    ap.add_argument("--only", help="comma-separated scenarios (default: all of a,b,c,b2,d,d2,d3)")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, run a and c once more under cProfile and print the top")
    ap.add_argument("--out", type=Path,
                    help="JSON output (default bench/results/offline-<date>.json)")
    a = ap.parse_args(argv)
    packets = a.packets or (300_000 if a.quick else 2_000_000)
    big = a.big_packets if a.big_packets is not None else (100_000 if a.quick else 500_000)
    reps = a.reps or (3 if a.quick else 5)
    loops = a.loops or (2 if a.quick else 3)
    scenarios = [s for s in SCENARIOS if not a.only or s.key in a.only.split(",")]
    for tool in ("gcc", "tcpdump"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.offline: {tool} is needed")

    # Ctrl-C or a kill: end what was started, remove what was made, by the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="pktipc-bench-"))
    shm_files: list[Path] = []
    started = time.monotonic()
    host = machine()      # before the runs: the sources measured, not later edits
    try:
        env = dict(os.environ, PKTIPC_RUNTIME_DIR=str(tmp / "run"))
        ctx = Ctx(procs, tmp, env, compile_baselines(tmp), loops=loops)
        variants = {"64": (packets, 64)}
        if big:
            variants["1400"] = (big, 1400)
        files: dict[str, dict[str, Any]] = {}
        for v, (n, size) in variants.items():
            path = Path(f"/dev/shm/pktipc-bench-{os.getpid()}-{v}.pcap")
            shm_files.append(path)
            secs = generate(path, n, size)
            # libpcap's count is the reference every client is checked against.
            counts = json.loads(subprocess.run([str(ctx.bin / "pcap_read"), str(path)],
                                               capture_output=True, check=True).stdout)
            ctx.expected[str(path)] = counts
            files[v] = {"path": str(path), "packets": counts["packets"],
                        "caplen_sum": counts["caplen_sum"], "bytes": path.stat().st_size,
                        "frame_size": size, "generate_s": round(secs, 2)}
            print(f"generated {path}: {counts['packets']:,} packets, "
                  f"{path.stat().st_size / 1e6:.0f} MB in {secs:.1f} s", flush=True)
        # One discarded broker run: first-time imports and page faults.
        run_broker(ctx, SCENARIOS[2], Path(files["64"]["path"]), passes=1)

        runs: list[dict[str, Any]] = []
        for rep in range(reps):
            order = scenarios[rep % len(scenarios):] + scenarios[:rep % len(scenarios)]
            for v in variants:
                for sc in order:
                    r = run(ctx, sc, Path(files[v]["path"]))
                    r.update(variant=v, rep=rep)
                    runs.append(r)
                    print(f"rep {rep + 1}/{reps} {v:>4}B {sc.key:3} "
                          f"{r['pps_mean'] / 1e6:6.2f} Mpkt/s per client"
                          + ("" if r["complete"] else "  INCOMPLETE"), flush=True)
        summary = summarize(runs, list(variants))
        if machine()["sources_sha256"] != host["sources_sha256"]:
            host["sources_changed_during_run"] = True
            print("note: pktipc/ or shm/ changed while this ran", file=sys.stderr)
        print(table(summary, files))

        save("offline", a.out, started, quick=a.quick, reps=reps, loops=loops, machine=host,
             files=files, broker="defaults: 64 slabs of 1 MiB, credit 8, policy block",
             summary=summary, runs=runs)

        if a.profile:
            prof = tmp / "profile"
            prof.mkdir()
            for key in ("a", "c"):
                sc = next(s for s in SCENARIOS if s.key == key)
                run_broker(ctx, sc, Path(files["64"]["path"]), profile=prof)
            print_profiles(prof)
    finally:
        procs.kill_all()
        for p in shm_files:
            p.unlink(missing_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
