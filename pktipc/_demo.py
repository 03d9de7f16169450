"""`pktipc demo`: a broker serving a capture file to two clients at once, a
live status line, and a summary table at the end."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ._client import broker_stats, connect
from ._errors import PktipcError
from ._paths import control_endpoint, ipc_path

CLIENT_NAMES = ("ids", "recorder", "flows", "metrics")


def default_capture() -> str:
    return str(resources.files("pktipc") / "data" / "demo.pcap")


@dataclass
class Tally:
    name: str
    packets: int = 0
    bytes: int = 0
    batches: int = 0
    seconds: float = 0.0
    error: str | None = None
    seqs_in_order: bool = True
    _next_seq: int = field(default=0, repr=False)


def _consume(broker: str, t: Tally) -> None:
    start = time.monotonic()
    try:
        with connect(broker, t.name, timeout=10) as client:
            for batch in client:
                with batch:
                    d = batch.descriptors
                    t.seqs_in_order &= batch.seq == t._next_seq
                    t._next_seq = batch.seq + len(batch)
                    t.packets += len(batch)
                    t.bytes += int(d["caplen"].sum())
                    t.batches += 1
    except PktipcError as e:
        t.error = str(e)
    t.seconds = time.monotonic() - start


def run(capture: str | None, clients: int, speed: float) -> int:
    if not 1 <= clients <= len(CLIENT_NAMES):
        raise ValueError(f"--clients must be between 1 and {len(CLIENT_NAMES)}")
    path = capture or default_capture()
    if not Path(path).is_file():
        raise PktipcError(f"{path}: no such capture file")
    name = f"demo-{int(time.time())}"
    cmd = [sys.executable, "-m", "pktipc", "serve", "--name", name, "-r", path,
           "--speed", str(speed), "--wait-clients", str(clients)]
    print(f"pktipc demo: broker {name!r} serves {path} at {speed:g}x real time "
          f"to {clients} clients", flush=True)
    broker = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        sock = ipc_path(control_endpoint(name))
        deadline = time.monotonic() + 15
        while sock is not None and not sock.exists():
            if broker.poll() is not None or time.monotonic() > deadline:
                err = (broker.stderr.read() if broker.stderr else "").strip()
                raise PktipcError(f"the broker did not start: {err.splitlines()[-1:] or '?'}")
            time.sleep(0.05)
        tallies = [Tally(n) for n in CLIENT_NAMES[:clients]]
        threads = [threading.Thread(target=_consume, args=(name, t), daemon=True)
                   for t in tallies]
        for th in threads:
            th.start()
        tty = sys.stdout.isatty()
        last = 0.0
        while any(th.is_alive() for th in threads):
            time.sleep(0.1)
            if time.monotonic() - last < (0.25 if tty else 1.0):
                continue
            last = time.monotonic()
            try:
                st = broker_stats(name, timeout=1)
            except PktipcError:
                continue
            c = st["counters"]
            per = "  ".join(f"{t.name} {t.packets}" for t in tallies)
            line = (f"  {c['packets']:>8} packets {c['bytes'] / 1e6:7.2f} MB in | {per} | "
                    f"slabs free {st['slabs']['free']}/{st['slabs']['count']}")
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
        for th in threads:
            th.join()
        status = broker.wait(timeout=30)
        if tty:
            print()
    finally:
        if broker.poll() is None:
            broker.terminate()
            broker.wait(timeout=10)
    print(f"\n{'client':<10} {'packets':>9} {'MB':>8} {'batches':>8} {'seconds':>8} "
          f"{'in order':>9}")
    for t in tallies:
        print(f"{t.name:<10} {t.packets:>9} {t.bytes / 1e6:>8.2f} {t.batches:>8} "
              f"{t.seconds:>8.2f} {'yes' if t.seqs_in_order else 'NO':>9}")
        if t.error:
            print(f"  {t.name}: {t.error}")
    same = len({t.packets for t in tallies}) == 1 and not any(t.error for t in tallies)
    print(f"\nevery client received every packet: {'yes' if same else 'NO'}")
    return 0 if same and status == 0 else 1
