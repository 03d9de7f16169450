"""Soak: a broker replaying at a steady rate for minutes while clients come
and go (some say BYE, some are killed), beside two steady clients.

    python -m bench.soak [--minutes M] [--rate PPS] [--churn SEC]

Reports the broker's memory (RSS, private) at the start and the end, and
packets lost by stage: broker drops, drops of each steady client, and
whether the steady `block` client saw every packet in order. Not a test:
run it by hand (it takes minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pktipc
from pktipc._tools.synth import write_pcap

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
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text()
                  .splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) + int(fields["RssFile"].split()[0])


def steady(name: str, client: str, policy: str, out: dict[str, object],
           stop: threading.Event) -> None:
    expect, gaps, n = 0, 0, 0
    in_order = True
    with pktipc.connect(name, client, policy=policy) as c:
        while not stop.is_set():
            b = c.next_batch(timeout=0.5)
            if b is None:
                continue
            with b:
                in_order &= b.seq >= expect
                expect = b.seq + len(b)
                n += len(b)
        gaps = sum(e - s for s, e in c.gaps)
    out.update(packets=n, gap_packets=gaps, in_order=in_order)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--rate", type=float, default=50_000, help="packets per second")
    ap.add_argument("--churn", type=float, default=0.5, help="seconds between new clients")
    a = ap.parse_args()
    rng = random.Random(7)
    tmp = Path(tempfile.mkdtemp(prefix="pktipc-soak-"))
    os.environ["PKTIPC_RUNTIME_DIR"] = str(tmp / "run")
    cap = tmp / "soak.pcap"
    with open(cap, "wb") as f:
        write_pcap(f, 100_000, rate_pps=a.rate)
    name = f"soak{os.getpid()}"
    broker = subprocess.Popen([sys.executable, "-m", "pktipc", "serve", "--name", name,
                               "-r", str(cap), "--loop", "0", "--realtime",
                               "--wait-clients", "2"], stderr=subprocess.DEVNULL)
    churners: list[subprocess.Popen[bytes]] = []
    results: dict[str, dict[str, object]] = {"block": {}, "drop": {}}
    stop = threading.Event()
    try:
        while not (tmp / "run" / f"{name}.ctl").exists():
            time.sleep(0.05)
        threads = [threading.Thread(target=steady, args=(name, f"steady-{p}", p, results[p],
                                                         stop)) for p in ("block", "drop")]
        for t in threads:
            t.start()
        time.sleep(1.0)
        rss_start = private_kb(broker.pid)
        start = time.monotonic()
        i = 0
        while time.monotonic() - start < a.minutes * 60:
            time.sleep(a.churn)
            i += 1
            churners.append(subprocess.Popen(
                [sys.executable, "-c", CHURNER, name, f"churn{i}", str(rng.uniform(0.5, 3))],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            for p in [p for p in churners if rng.random() < 0.1 and p.poll() is None]:
                p.kill()            # some die without a word
            churners = [p for p in churners if p.poll() is None]
        rss_end = private_kb(broker.pid)
        stats = pktipc.broker_stats(name)
        stop.set()
        for t in threads:
            t.join()
    finally:
        stop.set()
        for p in churners:
            p.kill()
            p.wait()
        broker.send_signal(signal.SIGINT)
        broker.wait(timeout=30)
    c = stats.counters
    report = {
        "minutes": a.minutes, "rate_pps": a.rate, "churn_s": a.churn,
        "clients_total": c.clients_total, "packets": c.packets,
        "broker_private_kb": {"start": rss_start, "end": rss_end},
        "lost": {"broker_drops": c.broker_drops, "client_drops_all": c.client_drops,
                 "steady_block": results["block"], "steady_drop": results["drop"]},
        "protocol_errors": c.protocol_errors,
    }
    print(json.dumps(report, indent=2))
    for p in tmp.rglob("*"):
        if p.is_file():
            p.unlink()
    for d in sorted(tmp.rglob("*"), reverse=True):
        d.rmdir()
    tmp.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
