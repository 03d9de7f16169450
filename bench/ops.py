"""Metrics against throughput: a broker scraped through `pktipc exporter`
against one that is not, and the exporter's own memory.

    .venv/bin/python -m bench.ops            # about 3 minutes
    .venv/bin/python -m bench.ops --quick    # under a minute

A capture file in /dev/shm (64-byte frames) is replayed, --loop L, to one
NumPy client (bench/_clientproc.py), as fast as the client allows. One
exporter runs for the whole benchmark; in the scraped variants a thread
fetches its /metrics every INTERVAL seconds while the replay runs (each
scrape is one STATS request to the broker). The variants alternate, their
order reversed at every other repetition. Throughput = packets the client
received / (end of stream - attached). Exporter memory is sampled from
/proc every 20 ms: private (RssAnon + RssFile) and VmHWM. Writes
bench/results/ops-<date>.json. Nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.offline import CLIENT, ROOT, MemSampler, machine, save
from pktipc._tools.synth import write_pcap

PY = sys.executable


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Scraper(threading.Thread):
    """GET url every `interval` s until stopped; keeps each scrape's duration."""

    def __init__(self, url: str, interval: float) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.took: list[float] = []
        self.bytes = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.monotonic()
            with urllib.request.urlopen(self.url, timeout=5) as r:
                self.bytes = len(r.read())
            self.took.append(time.monotonic() - t)
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - t)))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def one_run(n: int, pcap: Path, loops: int, runtime: Path, url: str,
            interval: float | None) -> dict[str, Any]:
    name = f"ops{os.getpid()}-{n}"
    broker = subprocess.Popen([PY, "-m", "pktipc", "serve", "--name", name, "-r", str(pcap),
                               "--loop", str(loops)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 20
        while not (runtime / f"{name}.ctl").exists():
            if broker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"broker did not start: {broker.stderr}")
            time.sleep(0.01)
        scraper = Scraper(url, interval) if interval else None
        if scraper:
            scraper.start()
        out = subprocess.run([PY, str(CLIENT), name, "c", "numpy"], capture_output=True,
                             text=True, cwd=ROOT, timeout=600, check=True).stdout
        if scraper:
            scraper.stop()
        assert broker.wait(timeout=60) == 0
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()
        if broker.stderr:
            broker.stderr.close()
    c = json.loads(out)
    return {"interval": interval, "packets": c["packets"],
            "mpps": c["packets"] / (c["t_end"] - c["t_attached"]) / 1e6,
            "scrapes": len(scraper.took) if scraper else 0,
            "scrape_ms_median": 1e3 * statistics.median(scraper.took) if scraper and
            scraper.took else None, "metrics_bytes": scraper.bytes if scraper else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--loops", type=int, default=200)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--intervals", default="1,0.1",
                    help="scrape intervals in seconds, beside not scraped (default: 1,0.1)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.quick:
        a.loops, a.reps = 60, 3
    started = time.monotonic()
    variants: list[float | None] = [None, *map(float, a.intervals.split(","))]
    tmp = Path(tempfile.mkdtemp(prefix="ops-bench-", dir="/dev/shm"))
    runtime = tmp / "run"
    os.environ["PKTIPC_RUNTIME_DIR"] = str(runtime)
    port = _port()
    exporter = subprocess.Popen([PY, "-m", "pktipc", "exporter", "--listen",
                                 f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    mem = MemSampler(exporter.pid)
    runs: list[dict[str, Any]] = []
    try:
        pcap = tmp / "ops.pcap"
        with open(pcap, "wb") as f:
            write_pcap(f, a.packets, sizes=(64,))
        url = f"http://127.0.0.1:{port}/metrics"
        time.sleep(1.0)
        mem.start()
        n = 0
        for rep in range(a.reps):
            for interval in variants if rep % 2 == 0 else variants[::-1]:
                n += 1
                r = one_run(n, pcap, a.loops, runtime, url, interval)
                r["rep"] = rep
                runs.append(r)
                print(f"rep {rep} scraped every {interval or '-'} s: {r['mpps']:.2f} Mpkt/s"
                      f" ({r['scrapes']} scrapes)", flush=True)
    finally:
        exporter.terminate()
        exporter.wait()
        mem.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    samples = [s for _, s in mem.samples]
    memory = {"private_peak_mib": max(s["RssAnon"] + s["RssFile"] for s in samples) / 1024,
              "private_last_mib": (samples[-1]["RssAnon"] + samples[-1]["RssFile"]) / 1024,
              "vmhwm_mib": max(s["VmHWM"] for s in samples) / 1024}
    summary: dict[str, Any] = {}
    for interval in variants:
        mine = [r for r in runs if r["interval"] == interval]
        base = {r["rep"]: r["mpps"] for r in runs if r["interval"] is None}
        summary[str(interval)] = {
            "mpps_median": statistics.median(r["mpps"] for r in mine),
            "mpps_range": [min(r["mpps"] for r in mine), max(r["mpps"] for r in mine)],
            "ratio_median": statistics.median(r["mpps"] / base[r["rep"]] for r in mine),
            "scrapes": sum(r["scrapes"] for r in mine),
            "scrape_ms_median": statistics.median([r["scrape_ms_median"] for r in mine
                                                   if r["scrape_ms_median"]] or [0.0]),
        }
    print("\n| scraped | Mpkt/s (median) | range | / not scraped (median of pairs) | "
          "scrapes | scrape ms (median) |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, s in summary.items():
        label = "not scraped" if k == "None" else f"every {float(k):g} s"
        print(f"| {label} | {s['mpps_median']:.2f} | {s['mpps_range'][0]:.2f}–"
              f"{s['mpps_range'][1]:.2f} | **{s['ratio_median']:.3f}** | {s['scrapes']} | "
              f"{s['scrape_ms_median']:.1f} |")
    print(f"\nexporter: private {memory['private_peak_mib']:.1f} MiB at its peak "
          f"({memory['private_last_mib']:.1f} at the end), VmHWM {memory['vmhwm_mib']:.1f} MiB")
    save("ops", a.out, started, machine=machine(), runs=runs, summary=summary, memory=memory,
         packets=a.packets, loops=a.loops)
    return 0


if __name__ == "__main__":
    sys.exit(main())
